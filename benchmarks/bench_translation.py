"""Multi30k de-en reproduction table at CPU scale: BLEU, chrF, perplexity and real bytes.

Runs the ``multi30k`` recipe (the stock OpenNMT-py tools with the plugin: a 2-layer LSTM
teacher, 1-layer students by quantized distillation and differentiable quantization, a
full-precision student, PM teachers, and the sequence-level distillation students
``student_seqkd4``/``student_seqkd4_wkd`` trained on the teacher's beam-5 translations of the
training source) in ``benchmarks/work/recipes/multi30k``, where every
trained model and the evaluation are cached, so a stopped run resumes; then copies the result
to ``benchmarks/results/translation.json``, which later runs reuse while the recipe's
parameters stay the same. The ``long`` experiment (``benchmarks/configs/multi30k-long.yaml``)
trains the 4-bit student 2.5x longer, into ``results/translation_long.json``. The ``seqkd``
experiment (``benchmarks/configs/multi30k-seqkd.yaml``) compresses the translator that ships with
the project (the recipe's cpu teacher, not trained again) into the three students of the
sequence-level distillation comparison, into ``results/translation_seqkd.json``. The
``transformer`` experiment runs the recipe's ``cpu_transformer`` scale (a 3+3-layer transformer
teacher, 3+1-layer students on the int4 kernel grid, PM 4-bit) into
``results/translation_transformer.json``; ``bench_int4 --transformer`` times the same models.

    python -m benchmarks.bench_translation [--scale cpu]
        [--experiment main|long|seqkd|transformer|all] [--rerun]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS, load_result
from compressor.format.files import atomic_write_bytes, atomic_write_json
from recipes.experiments import load_recipe, run_recipe

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "recipes"


@dataclass(frozen=True)
class Experiment:
    """One table: a recipe (name or file), the result file it is kept in, and how it runs."""

    recipe: str
    result: str
    work: str  # its folder under benchmarks/work/recipes
    plot: str | None = None  # copied next to the report
    shipped_teacher: bool = False  # compress the translator that ships with qdistill
    # the recipe scale that each --scale runs (default: the same name)
    scales: Mapping[str, str] = field(default_factory=dict)

    def recipe_scale(self, scale: str) -> str:
        return self.scales.get(scale, scale)


EXPERIMENTS = {
    "main": Experiment("multi30k", "translation", "multi30k", "multi30k_bleu_vs_size.png"),
    "long": Experiment(
        str(HERE / "configs" / "multi30k-long.yaml"), "translation_long", "multi30k-long"
    ),
    "seqkd": Experiment(
        str(HERE / "configs" / "multi30k-seqkd.yaml"),
        "translation_seqkd",
        "multi30k-seqkd",
        shipped_teacher=True,
    ),
    "transformer": Experiment(
        "multi30k",
        "translation_transformer",
        "multi30k-transformer",
        scales={"cpu": "cpu_transformer"},
    ),
}
# experiments that exist at the cpu scale only
CPU_ONLY = ("long", "seqkd", "transformer")


def run_experiment(experiment: str, scale: str = "cpu", rerun: bool = False) -> dict:
    """One experiment's result: cached while its recipe's parameters stay the same."""
    chosen = EXPERIMENTS[experiment]
    recipe = load_recipe(chosen.recipe)
    scale = chosen.recipe_scale(scale)
    cached = load_result(chosen.result)
    if (
        not rerun
        and cached is not None
        and cached["scale"] == scale
        and {k: v for k, v in cached["parameters"].items() if k != "name"}
        == recipe.parameters(scale)
    ):
        print(f"{recipe.name} {scale}: cached in {RESULTS / f'{chosen.result}.json'}", flush=True)
        print_seqkd(cached["rows"])
        return cached
    work = work_folder(experiment)
    teacher = None
    if chosen.shipped_teacher:
        from onmt_plugin import pretrained

        teacher = work / "shipped_teacher" / "teacher.pt"
        if not teacher.exists():
            pretrained.write_checkpoint(pretrained.MULTI30K_DE_EN, teacher)
    result = run_recipe(recipe, scale, work, teacher=teacher)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{chosen.result}.json", result)
    if chosen.plot:
        atomic_write_bytes(HERE / chosen.plot, (work / "work" / "bleu_vs_size.png").read_bytes())
    print_seqkd(result["rows"])
    return result


def work_folder(experiment: str) -> Path:
    """Where an experiment's recipe keeps its models and evaluations (its ``output_dir``)."""
    return WORK / EXPERIMENTS[experiment].work


def print_seqkd(rows: list[dict]) -> None:
    """The sequence-level distillation rows beside student_qd4 (their word-level twin trained
    on the references) and what translating the training corpus cost; nothing without them."""
    seqkd = next((r["seqkd"] for r in rows if r.get("seqkd")), None)
    if not seqkd:
        return
    print(
        f"teacher's beam-{seqkd['beam_size']} translation of {seqkd['lines']:,} training "
        f"sentences: {seqkd['seconds']:,.0f} s",
        flush=True,
    )
    for r in rows:
        if r["name"] in ("teacher", "student_qd4") or r.get("seqkd"):
            beam = f", beam {r['beam_size']} {r['bleu_beam']:.2f}" if "bleu_beam" in r else ""
            print(
                f"  {r['name']:<20} BLEU greedy {r['bleu']:.2f}{beam}, chrF {r['chrf']:.2f}, "
                f"ppl/word {r['ppl_word']:.2f}, {r['bytes']:,} bytes",
                flush=True,
            )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--experiment", default="all", choices=(*EXPERIMENTS, "all"))
    parser.add_argument("--rerun", action="store_true", help="ignore the cached result")
    args = parser.parse_args(argv)
    chosen = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    if args.scale != "cpu":
        chosen = [e for e in chosen if e not in CPU_ONLY]
    return [run_experiment(e, args.scale, args.rerun) for e in chosen]


if __name__ == "__main__":
    main()
