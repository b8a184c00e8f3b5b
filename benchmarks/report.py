"""Render benchmarks/REPORT.md and its plots from benchmarks/results/.

python -m benchmarks.report
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS
from compressor.format.files import atomic_write, atomic_write_text
from recipes import cifar

HERE = Path(__file__).resolve().parent


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cifar_section(lines: list[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "cifar").glob("*.json"))]
    # The ablation has its own section; its W4A4 QKD row stands in the table for all of it.
    ablation = set(cifar.QKD_ABLATION) - {"qkd_w4a4"}
    rows = [r for r in rows if "accuracy" in r and r["name"] not in ablation]
    if not rows:
        lines.append("_No CIFAR-10 results yet: run `python -m benchmarks.bench_cifar`._\n")
        return
    order = {"teacher": 0, "student_fp32": 1, "student_fp32_distilled": 2}
    rows.sort(key=lambda r: (order.get(r["name"], 3), r["method"], r["bits"] or 32))
    by_name = {r["name"]: r for r in rows}
    teacher_fp32 = by_name.get("teacher", {}).get("fp32_bytes")
    student_fp32 = by_name.get("student_fp32", {}).get("fp32_bytes")
    cfg = rows[0]["config"]
    env = rows[0]["environment"]
    lines.append(
        f"Scale: {cfg['train_images']:,} training and {cfg['test_images']:,} test images, "
        f"{cfg['steps']} steps of batch {cfg['batch_size']}; teacher: "
        f"{cfg.get('teacher_depth', 3)}-block CNN of width {cfg['teacher_width']}, student: "
        f"{cfg.get('student_depth', 2)}-block CNN of width {cfg['student_width']}. "
        f"Machine: {env['processor']}, {env['cpu_count']} cores, torch {env['torch']}, commit "
        f"`{(env.get('commit') or '')[:10]}`. This is a CPU-scale reproduction: absolute "
        f"accuracies are far below published CIFAR-10 figures; compare the rows with each other.\n"
    )
    lines.append(
        "| model | method | bits | Acc@1 % | packed bytes | vs fp32 teacher | vs fp32 student "
        "| entropy-coded (ans) bytes |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = r["packed_bytes"] or r["fp32_bytes"]
        vs_t = f"{teacher_fp32 / size:.1f}x" if teacher_fp32 else ""
        vs_s = f"{student_fp32 / size:.1f}x" if student_fp32 else ""
        ans = f"{r['packed_bytes_ans']:,}" if r.get("packed_bytes_ans") else "-"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['bits'] or 'fp32'} | {r['accuracy']:.2f} | "
            f"{size:,} | {vs_t} | {vs_s} | {ans} |"
        )
    lines.append("")
    lines.extend(_cifar_goals(by_name))
    _cifar_plot(rows)
    lines.append("![CIFAR-10 accuracy against file size](cifar_accuracy_vs_bytes.png)\n")


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None from one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (variance / len(values)) ** 0.5


def _pm(mean: float, se: float | None, n: int) -> str:
    return f"{mean:.2f} ± {se:.2f} (n={n})" if se is not None else f"{mean:.2f} (n=1)"


def _qkd_section(lines: list[str]) -> None:
    """QKD against QAT and QAT with a frozen teacher's distillation, at each bit width: same
    quantizers, steps, batches and seeds (``recipes.cifar.QKD_ABLATION``)."""
    results = {}
    for name in (*cifar.QKD_ABLATION, "teacher", "student_fp32"):
        r = _load(RESULTS / "cifar" / f"{name}.json")
        if r is not None and (name in ("teacher", "student_fp32") or r.get("settings")):
            results[name] = r
    if not any(n in results for n in cifar.QKD_ABLATION):
        lines.append(
            "_No QKD ablation yet: run `python -m benchmarks.bench_cifar --only qkd-ablation`._\n"
        )
        return
    some = next(results[n] for n in cifar.QKD_ABLATION if n in results)
    cfg = some["config"]
    phases = "/".join(str(p) for p in _qkd_phases(results))
    lines.append(
        f"Every row fine-tunes the same trained fp32 student for {cfg['steps']} steps of batch "
        f"{cfg['batch_size']} (all phases counted), weights and activations on LSQ quantizers "
        "(first and last layer in full precision), same batches per seed, same optimizer and "
        f"learning-rate schedule; distillation at T={cfg['temperature']}, alpha={cfg['alpha']}. "
        f"QKD splits the steps {phases} (self-studying / co-studying / tutoring). Seeds change "
        "the order of the batches. Reference: teacher "
        + ", fp32 student ".join(
            f"{results[n]['accuracy']:.2f}%" for n in ("teacher", "student_fp32") if n in results
        )
        + ". Command: `python -m benchmarks.bench_cifar --only qkd-ablation --workers 2`. "
        f"On {cfg['test_images']:,} test images an accuracy near 76% carries a binomial "
        f"standard error of {100 * (0.76 * 0.24 / cfg['test_images']) ** 0.5:.2f} points from "
        "the test set alone; a gap from one seed smaller than about twice that is not a "
        "finding.\n"
    )
    lines.append(
        "| W/A bits | QAT, labels only | QAT + frozen-teacher KD | QKD | QKD minus the better "
        "other (paired by seed) | packed bytes | train s (QAT / +KD / QKD) | teacher after "
        "co-studying |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for bits in cifar.ABLATION_BITS:
        by_method = {}
        for method in ("qat", "qat_kd", "qkd"):
            by_method[method] = {
                seed: results[name]
                for seed in cifar.ABLATION_SEEDS[bits]
                if (name := cifar.ablation_name(method, bits, seed)) in results
            }
        if not all(by_method.values()):
            continue
        cells = {
            m: _mean_se([r["accuracy"] for r in runs.values()]) for m, runs in by_method.items()
        }
        rival = max(("qat", "qat_kd"), key=lambda m: cells[m][0])
        seeds = sorted(set(by_method["qkd"]) & set(by_method[rival]))
        gap, gap_se = _mean_se(
            [by_method["qkd"][s]["accuracy"] - by_method[rival][s]["accuracy"] for s in seeds]
        )
        times = " / ".join(
            f"{sum(r['train_s'] for r in runs.values()) / len(runs):.0f}"
            for runs in by_method.values()
        )
        teacher_after = _mean_se(
            [r["co_studied_teacher_accuracy"] for r in by_method["qkd"].values()]
        )[0]
        teacher_before = next(iter(by_method["qkd"].values()))["teacher_accuracy"]
        lines.append(
            f"| W{bits}A{bits} | "
            + " | ".join(_pm(*cells[m], len(by_method[m])) for m in ("qat", "qat_kd", "qkd"))
            + f" | {_pm(gap, gap_se, len(seeds))} | "
            f"{next(iter(by_method['qkd'].values()))['packed_bytes']:,} | {times} | "
            f"{teacher_before:.2f} -> {teacher_after:.2f} |"
        )
        rival_name = {"qat": "QAT", "qat_kd": "QAT + KD"}[rival]
        spread = f" ± {gap_se:.2f} (one standard error)" if gap_se is not None else ""
        verdict = (
            f"- W{bits}A{bits}: QKD {'beat' if gap > 0 else 'did not beat'} both other rows: "
            f"{gap:+.2f}{spread} points against the better of them ({rival_name})"
        )
        if bits in (3, 2):
            verdict += f"; goal +0.5: {'met' if gap >= 0.5 else 'MISSED'}"
        verdicts.append(verdict)
    lines.append("")
    lines.extend(verdicts)
    lines.append("")
    lines.extend(_qkd_checks(results))


def _qkd_checks(results: dict) -> list[str]:
    """What ``benchmarks.qkd_checks`` found: the activation quantizers at initialisation and
    the QKD variants, each beside the ablation's QKD row it varies."""
    folder = RESULTS / "qkd_checks"
    out = []
    for path in sorted(folder.glob("activations_*.json")):
        check = json.loads(path.read_text())
        layers = "; ".join(
            f"layer {name}: step {layer['step']:.3f}, {100 * layer['clipped_share']:.1f}% "
            f"clipped, {100 * layer['zero_share']:.1f}% rounded to zero"
            for name, layer in check["layers"].items()
        )
        out.append(
            f"- Activation quantizers right after initialisation, W{check['bits']}A{check['bits']} "
            f"(inputs of the next batch): {layers}."
        )
    for path in sorted(folder.glob("qkd_*.json")):
        variant = json.loads(path.read_text())
        row = results.get(cifar.ablation_name("qkd", variant["bits"], variant["seed"]))
        if row is not None and variant["config"] != row["config"]:
            continue  # a quick try at other parameters, not a check of this row
        against = f" against {row['accuracy']:.2f}% for the row itself" if row else ""
        changed = ", ".join(f"{k} {v}" for k, v in variant["changed"].items())
        out.append(
            f"- QKD W{variant['bits']}A{variant['bits']} seed {variant['seed']} with {changed}: "
            f"{variant['accuracy']:.2f}%{against}; teacher {variant['teacher_accuracy']:.2f}% -> "
            f"{variant['co_studied_teacher_accuracy']:.2f}% after co-studying."
        )
    if out:
        out.insert(0, "Checks (`python -m benchmarks.qkd_checks --workers 2`):\n")
        out.append("")
    return out


def _qkd_phases(results: dict) -> list[int]:
    """The QKD rows' phase lengths (all rows share them)."""
    for name in cifar.QKD_ABLATION:
        if name in results and "phases" in results[name]:
            return list(results[name]["phases"].values())
    return list(cifar.runs.QKD_PHASES)


def _goal(text: str, value: float, target: float, met: bool) -> str:
    return f"- {text}: {value:.2f} (goal {target}) - {'met' if met else 'MISSED'}"


def _size_goals(label: str, fp32_bytes: int, packed: int | None, ans: int | None) -> list[str]:
    """The 7.3x size goal for one 4-bit file, bit-packed and, where measured, entropy-coded."""
    out = []
    for size, how in ((packed, "packed file"), (ans, "entropy-coded (`--entropy ans`) file")):
        if size:
            ratio = fp32_bytes / size
            out.append(
                _goal(
                    f"{label}: {how} smaller than its own fp32 file, times",
                    ratio,
                    ">= 7.3",
                    ratio >= 7.3,
                )
            )
    return out


def _cifar_goals(by_name: dict) -> list[str]:
    """The issue's goals, each with its number, for the configurations present."""
    out = ["Goals:", ""]
    acc = {name: r["accuracy"] for name, r in by_name.items()}
    if {"qd_4", "student_fp32_distilled"} <= acc.keys():
        gap = acc["student_fp32_distilled"] - acc["qd_4"]
        out.append(
            _goal(
                "4-bit quantized distillation below the distilled fp32 student, points",
                gap,
                "<= 0.5",
                gap <= 0.5,
            )
        )
    if {"qd_4", "qd_4_kernel"} <= acc.keys():
        apart = abs(acc["qd_4"] - acc["qd_4_kernel"])
        out.append(
            _goal(
                "4-bit quantized distillation on the int4 kernel grid against the min-max grid, "
                f"points apart ({acc['qd_4_kernel']:.2f} against {acc['qd_4']:.2f})",
                apart,
                "<= 0.3",
                apart <= 0.3,
            )
        )
    if "pm_2" in acc and ({"qd_2", "dq_2"} & acc.keys()):
        best = max(acc[n] for n in ("qd_2", "dq_2") if n in acc)
        margin = best - acc["pm_2"]
        out.append(
            _goal(
                "2-bit: best of quantized distillation / differentiable quantization "
                "above PM, points",
                margin,
                ">= 20",
                margin >= 20,
            )
        )
    for name, r in sorted(by_name.items()):
        if r.get("bits") == 4:
            out.extend(
                _size_goals(name, r["fp32_bytes"], r.get("packed_bytes"), r.get("packed_bytes_ans"))
            )
    out.append("")
    return out if len(out) > 3 else []


def _translation_section(lines: list[str]) -> None:
    result = _load(RESULTS / "translation.json")
    if not result:
        lines.append(
            "_No translation results yet: run `python -m benchmarks.bench_translation`._\n"
        )
        return
    p, env = result["parameters"], result["environment"]
    lines.append(
        f"Multi30k de-en, {result['scale']} scale: sentencepiece {p['vocab_size']} pieces per "
        f"language, {p.get('teacher_layers', 2)}-layer LSTM teacher ({p['hidden_size']} units, "
        f"{p['teacher_steps']} steps), 1-layer students started from its first layers "
        f"({p['student_steps']} steps), test_2016_flickr, greedy decoding (and beam search "
        "where a column says so). Machine: "
        f"{env['processor']}, {env['cpu_count']} cores, OpenNMT-py {env.get('OpenNMT-py')}. "
        "Tokens/s include `onmt_translate` start-up (a lower bound).\n"
    )
    rows = result["rows"]
    lines.extend(_translation_table(rows))
    by_name = {r["name"]: r for r in rows}
    lines.append("")
    lines.extend(_seqkd_notes(rows, p))
    lines.append(f"BLEU signature: `{rows[0]['extra'].get('bleu_signature', '')}`\n")
    if {"teacher", "student_qd4"} <= by_name.keys():
        gap = by_name["teacher"]["bleu"] - by_name["student_qd4"]["bleu"]
        lines.append(
            _goal(
                "4-bit quantized-distillation student below the teacher, BLEU",
                gap,
                "<= 1.0",
                gap <= 1.0,
            )
        )
    if "student_fp32" in by_name:  # the students' own fp32 file: the same 1-layer model
        for name, r in by_name.items():
            if name.startswith(("student_qd4", "student_dq4")):
                lines.extend(
                    _size_goals(
                        name, by_name["student_fp32"]["bytes"], r["bytes"], r.get("bytes_ans")
                    )
                )
    lines.append("")
    lines.append("![BLEU against file size](multi30k_bleu_vs_size.png)\n")
    fp32_student = by_name.get("student_fp32", {}).get("bytes")
    _translation_long(lines, p["student_steps"], fp32_student)
    _translation_seqkd(lines)
    _translation_transformer(lines)


def _bucket_section(lines: list[str]) -> None:
    """Bucket size against accuracy and bytes (``bench_bucket``)."""
    result = _load(RESULTS / "bucket.json")
    if not result:
        return
    fp32 = result["fp32_bytes"]
    lines.append(
        f"**Bucket size** (`python -m benchmarks.bench_bucket`): {result['what']}; every bucket "
        "stores an fp32 offset and scale. The student in fp32: "
        f"{result['fp32_accuracy']:.2f}%, {fp32:,} bytes.\n"
    )
    lines.append("| bucket | Acc@1 % | packed bytes | vs fp32 | ans bytes | vs fp32 |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        ans = r.get("packed_bytes_ans")
        ans_cells = f"{ans:,} | {fp32 / ans:.2f}x" if ans else "- | -"
        lines.append(
            f"| {r['bucket_size'] or 'whole tensor'} | {r['accuracy']:.2f} | "
            f"{r['packed_bytes']:,} | {fp32 / r['packed_bytes']:.2f}x | {ans_cells} |"
        )
    lines.append("")


def _translation_table(rows: list[dict]) -> list[str]:
    ans = any(r.get("bytes_ans") for r in rows)
    # BLEU and chrF with beam search too, where the run decoded some models that way (seqkd)
    beam = next((r["beam_size"] for r in rows if r.get("beam_size")), None)
    head = "| model | bytes | vs teacher | BLEU | chrF |"
    head += f" BLEU beam {beam} | chrF beam {beam} |" if beam else ""
    head += " ppl/word | tokens/s | agreement |"
    out = [head + (" ans bytes |" if ans else ""), "|---|" + "---:|" * (7 + 2 * bool(beam) + ans)]
    for r in rows:
        beam_cells = ""
        if beam:
            beam_cells = (
                f" {r['bleu_beam']:.2f} | {r['chrf_beam']:.2f} |"
                if "bleu_beam" in r
                else " - | - |"
            )
        line = (
            f"| {r['name']} | {r['bytes']:,} | {r['compression']:.2f}x | {r['bleu']:.2f} | "
            f"{r['chrf']:.2f} |{beam_cells} {r['ppl_word']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['agreement_bleu']:.1f} |"
        )
        if ans:
            line += f" {r['bytes_ans']:,} |" if r.get("bytes_ans") else " - |"
        out.append(line)
    return out


def _seqkd_notes(rows: list[dict], parameters: dict) -> list[str]:
    """The sequence-level distillation rows: what they are and what translating the training
    corpus with the teacher cost (none without them)."""
    seqkd = next((r["seqkd"] for r in rows if r.get("seqkd")), None)
    if not seqkd:
        return []
    beam = next((r["beam_size"] for r in rows if r.get("beam_size")), None)
    resumed = f", {seqkd['reused_chunks']} chunks reused" if seqkd.get("reused_chunks") else ""
    text = (
        "**Sequence-level distillation** (Kim and Rush, 2016): the teacher translated the "
        f"{seqkd['lines']:,} training sentences with beam {seqkd['beam_size']} "
        f"(`qdistill onmt-seqkd`) in {seqkd['seconds']:,.0f} s ({seqkd['seconds'] / 60:.1f} min)"
        f"{resumed}. "
        "student_seqkd4 and student_seqkd4_wkd are 4-bit students started and trained like "
        "student_qd4 (same steps and seed) on those translations instead of the references: "
        "student_seqkd4 on them alone (distill_alpha 0), student_seqkd4_wkd with word-level "
        f"distillation on top (distill_alpha {parameters.get('distill_alpha', 0.7):g})."
    )
    if beam:
        text += f" BLEU/chrF beam {beam}: the same models decoded with beam search."
    return [text, ""]


def _translation_seqkd(lines: list[str]) -> None:
    """Sequence-level against word-level distillation on the shipped translator
    (``bench_translation --experiment seqkd``), with issue 19's goals."""
    result = _load(RESULTS / "translation_seqkd.json")
    if not result:
        return
    rows = result["rows"]
    lines.append(
        "**Sequence-level against word-level distillation** (`python -m "
        "benchmarks.bench_translation --experiment seqkd`, one seed): the translator that "
        "ships with qdistill (the cpu scale's teacher, not trained again) compressed into "
        "three 1-layer 4-bit students, identical but for the training target and the "
        "distillation term.\n"
    )
    lines.extend(_translation_table(rows))
    lines.append("")
    lines.extend(_seqkd_notes(rows, result["parameters"]))
    by_name = {r["name"]: r for r in rows}
    if {"student_qd4", "student_seqkd4_wkd"} <= by_name.keys():
        gain = by_name["student_seqkd4_wkd"]["bleu"] - by_name["student_qd4"]["bleu"]
        lines.append(
            _goal(
                "seqkd + word-level above word-level only, BLEU greedy", gain, ">= 0.5", gain >= 0.5
            )
        )
    if {"student_qd4", "student_seqkd4"} <= by_name.keys():
        alone = by_name["student_seqkd4"]["bleu"] - by_name["student_qd4"]["bleu"]
        lines.append(f"- seqkd alone above word-level only, BLEU greedy: {alone:+.2f} (no goal)")
    if "bleu_beam" in by_name.get("student_seqkd4_wkd", {}) and "bleu_beam" in by_name["teacher"]:
        gap = by_name["teacher"]["bleu_beam"] - by_name["student_seqkd4_wkd"]["bleu_beam"]
        lines.append(
            _goal(
                "seqkd + word-level below the fp32 teacher, BLEU beam 5", gap, "<= 0.5", gap <= 0.5
            )
        )
    seqkd = next((r["seqkd"] for r in rows if r.get("seqkd")), None)
    if seqkd and not seqkd.get("reused_chunks"):
        minutes = seqkd["seconds"] / 60
        lines.append(
            _goal("translating the training corpus, minutes", minutes, "<= 10", minutes <= 10)
        )
    lines.append("")


def _translation_transformer(lines: list[str]) -> None:
    """The transformer rows (``bench_translation --experiment transformer``), with issue 18's
    goals: the 4-bit student within 1.0 BLEU of its teacher, its file 7x smaller."""
    result = _load(RESULTS / "translation_transformer.json")
    if not result:
        lines.append(
            "_No transformer rows yet: run `python -m benchmarks.bench_translation --experiment "
            "transformer` (the recipe's cpu_transformer scale, about 3 hours on 2 cores)._\n"
        )
        return
    p = result["parameters"]
    lines.append(
        f"**Transformers** (`python -m benchmarks.bench_translation --experiment transformer`, "
        f"scale {result['scale']}): a {p['teacher_layers']}+{p['teacher_layers']}-layer "
        f"transformer teacher (d_model {p['hidden_size']}, {p['heads']} heads, feed-forward "
        f"{p['transformer_ff']}, {p['teacher_steps']} steps), "
        f"{p['student_layers']}+{p.get('student_dec_layers') or p['student_layers']}-layer "
        f"students started from its layers ({p['student_steps']} steps; the 4-bit one on the "
        f"{p.get('quant_grid', 'minmax')} grid, bucket {p['bucket_size']}), the PM teacher, and "
        "the 4-bit student exported to CTranslate2 with its int8 re-quantization "
        "(`student_qd4_ct2_int8`, translated by CTranslate2).\n"
    )
    lines.extend(_translation_table(result["rows"]))
    by_name = {r["name"]: r for r in result["rows"]}
    lines.append("")
    if {"teacher", "student_qd4"} <= by_name.keys():
        gap = by_name["teacher"]["bleu"] - by_name["student_qd4"]["bleu"]
        lines.append(
            _goal("4-bit transformer student below its teacher, BLEU", gap, "<= 1.0", gap <= 1.0)
        )
    if {"student_fp32", "student_qd4"} <= by_name.keys():
        ratio = by_name["student_fp32"]["bytes"] / by_name["student_qd4"]["bytes"]
        lines.append(
            _goal(
                "4-bit transformer student's packed file smaller than its fp32 checkpoint, times",
                ratio,
                ">= 7",
                ratio >= 7,
            )
        )
    lines.append("")


def _translation_long(lines: list[str], main_steps: int, fp32_student: int | None) -> None:
    """The 4-bit student trained longer (``bench_translation --experiment long``)."""
    result = _load(RESULTS / "translation_long.json")
    if not result:
        return
    p = result["parameters"]
    lines.append("")
    lines.append(
        f"**Longer training** (`python -m benchmarks.bench_translation --experiment long`): "
        f"the same teacher recipe, the 4-bit student trained for {p['student_steps']} steps "
        f"instead of {main_steps}:\n"
    )
    lines.extend(_translation_table(result["rows"]))
    by_name = {r["name"]: r for r in result["rows"]}
    if {"teacher", "student_qd4"} <= by_name.keys():
        gap = by_name["teacher"]["bleu"] - by_name["student_qd4"]["bleu"]
        lines.append("")
        lines.append(
            _goal(
                f"4-bit student after {p['student_steps']} steps below its teacher, BLEU",
                gap,
                "<= 1.0",
                gap <= 1.0,
            )
        )
        if fp32_student:  # the main table's fp32 student: the same 1-layer model
            r = by_name["student_qd4"]
            lines.extend(
                _size_goals(
                    f"student_qd4 after {p['student_steps']} steps",
                    fp32_student,
                    r["bytes"],
                    r.get("bytes_ans"),
                )
            )
    lines.append("")


def _cifar_plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        size = r["packed_bytes"] or r["fp32_bytes"]
        label = r["name"]
        marker = "*" if r["name"] == "teacher" else ("s" if r["bits"] is None else "o")
        ax.scatter(size, r["accuracy"], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(
            label, (size, r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("file size (bytes, log scale): packed file, or fp32 safetensors")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("Accuracy against real file size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(HERE / "cifar_accuracy_vs_bytes.png", "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)


def _spread(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _training_cost_section(lines: list[str]) -> None:
    cost = _load(RESULTS / "training_cost.json")
    if not cost:
        lines.append("_No figures yet: run `python -m benchmarks.bench_training_cost`._\n")
        return
    lines.append(
        "One quantized-distillation step of a 4-bit student against one plain fp32 step of "
        "the same student without a teacher, same batches, median and min-max of "
        f"{cost['config']['repeats']}+ repeats (goal {cost['goal']}):\n"
    )

    def against_goal(ratio: dict, what: str) -> str:
        return f"- {what}: {_spread(ratio)} - {'met' if ratio['median'] <= 1.3 else 'MISSED'}"

    for part in ("vision", "translation"):
        if part in cost:
            r = cost[part]
            lines.append(f"{against_goal(r['ratio'], part)}; {r['setup']}")
            if "ratio_teacher_table" in r:
                lines.append(
                    against_goal(
                        r["ratio_teacher_table"],
                        f"{part} distilling from the "
                        "teacher's logits computed once per image and view "
                        "(`recipes.small_runs.teacher_logit_table`, exact, what the "
                        "CIFAR-10 recipe does)",
                    )
                    + f"; {r['ratio_teacher_table_with_its_cost']:.2f}x with the table's "
                    "one-time cost spread over a whole recipe run"
                )
            if "ratio_top_k_cached" in r:
                lines.append(
                    against_goal(
                        r["ratio_top_k_cached"],
                        f"{part} with `-distill_topk "
                        f"{r['top_k']}` once its cache is warm (from the second epoch "
                        "on)",
                    )
                )
    topk = _load(RESULTS / "topk.json")
    if topk:
        rows = {r["name"]: r for r in topk["rows"]}
        k = topk["scale"]["top_k"][0]
        exact, cached = rows["student_qd4"], rows[f"student_qd4_top{k}"]
        lines.append(
            f"- what `-distill_topk {k}` costs in quality (`python -m benchmarks.bench_topk`, "
            f"the demo's scale: {topk['counts']['train.src']:,} pairs, "
            f"{topk['scale']['student_steps']} student steps): BLEU {cached['bleu']:.2f} against "
            f"{exact['bleu']:.2f} with the full teacher, chrF {cached['chrf']:.2f} against "
            f"{exact['chrf']:.2f}, perplexity per word {cached['ppl_word']:.2f} against "
            f"{exact['ppl_word']:.2f} (one seed)"
        )
    lines.append("")


def _inference_section(lines: list[str]) -> None:
    speed = _load(RESULTS / "inference.json")
    if not speed:
        lines.append("_No figures yet: run `python -m benchmarks.bench_inference`._\n")
        return
    lines.append(
        "Student time over teacher time on this CPU, median and min-max of "
        f"{speed['config']['repeats']} repeats, next to what the depth (weighted layers) "
        "and the FLOPs predict:\n"
    )
    lines.append("| models | batch | teacher | student | student / teacher | depth | FLOPs |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for r in speed["classification"]:
        t, s = r["teacher"], r["student"]
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['batch_shape']))} | "
            f"{t['images_per_s']:.0f} img/s | {s['images_per_s']:.0f} img/s | "
            f"{_spread(r['student_over_teacher_time'])} | {r['predicted_by_depth']:.2f} | "
            f"{r['predicted_by_flops']:.2f} |"
        )
    if "translation" in speed:
        r = speed["translation"]
        lines.append(
            f"| onmt_translate, {r['sentences']} test sentences, beam "
            f"{r['settings']['beam_size']} | {r['settings']['batch_size']} sentences | "
            f"{r['teacher']['tokens_per_s']:.0f} tok/s | {r['student_qd4']['tokens_per_s']:.0f} "
            f"tok/s | {_spread(r['student_over_teacher_time'])} | {r['predicted_by_depth']:.2f} "
            "| |"
        )
    lines.append("")
    if "loading" in speed:
        load = speed["loading"]
        lines.append(
            f"Loading the packed 4-bit student ({load['packed']['bytes']:,} bytes) takes "
            f"{_spread(load['packed_over_fp32_time'])} the time of loading the same weights as "
            f"an fp32 checkpoint ({load['fp32_checkpoint']['bytes']:,} bytes).\n"
        )


def _timing_section(lines: list[str]) -> None:
    quantizer = _load(RESULTS / "quantizer.json")
    if quantizer:
        f, e = quantizer["fused_over_clone"], quantizer["eager_over_clone"]
        lines.append(
            f"- `quantize_tensor`, {quantizer['config']['numel']:,} fp32 values, "
            f"{quantizer['config']['bits']} bits: fused path {f['median']:.2f}x of `clone` "
            f"(spread {f['min']:.2f}-{f['max']:.2f}), eager path {e['median']:.2f}x; goal 1.5x."
        )
    packed = _load(RESULTS / "packed.json")
    if packed:
        for label in ("bitpack", "huffman", "ans"):
            u = packed[f"unpack_{label}_over_load"]
            p = packed[f"pack_{label}_over_save"]
            size = packed[f"bytes_{label}"]
            lines.append(
                f"- packed file ({label}), {packed['config']['weights'] / 1e6:.1f}M 4-bit weights: "
                f"{size:,} bytes ({packed['fp32_bytes'] / size:.2f}x "
                f"smaller than fp32); unpack {u['median']:.2f}x of fp32 `torch.load` "
                f"({u['min']:.2f}-{u['max']:.2f}), pack {p['median']:.2f}x of `torch.save`."
            )
    lines.append("")


def _int4_section(lines: list[str]) -> None:
    from benchmarks.bench_int4 import report, transformer_report

    result = _load(RESULTS / "int4.json")
    if result is None:
        lines.append("_No int4 runtime results yet: run `python -m benchmarks.bench_int4`._\n")
        return
    env = result.get("environment", {})
    config = result.get("config", {})
    lines.append(
        f"`onmt_translate` of 4-bit LSTM students trained on the int4 kernel grid, on the int4 "
        f"kernel against the same student through the fp32 path (`QDISTILL_RUNTIME=fp32`), "
        f"runs taken in turn; {config.get('sentences', '?')} test sentences, "
        f"{config.get('threads', '?')} thread(s), {env.get('processor', '?')} with "
        f"{env.get('cpu_count', '?')} cores, torch {env.get('torch', '?')}. Tokens/s is "
        "OpenNMT's own figure (`-report_time`, model loading excluded).\n"
    )
    lines.append(report(result) + "\n")
    transformer = _load(RESULTS / "int4_transformer.json")
    if transformer is None:
        lines.append(
            "_No transformer results yet: run `python -m benchmarks.bench_int4 --transformer "
            "--skip-lstm` (about 3 hours on 2 cores)._\n"
        )
    else:
        lines.append(
            transformer_report(transformer["transformer"], transformer.get("config")) + "\n"
        )


def main() -> Path:
    lines = ["# qdistill benchmark report", ""]
    lines.append(
        "Generated by `make bench` from `benchmarks/results/*.json`; every figure there "
        "carries its configuration, versions and machine. Timings are ratios measured "
        "in the same run (median of repeats, min-max spread).\n"
    )
    lines.append("## CIFAR-10\n")
    _cifar_section(lines)
    lines.append("### QKD ablation\n")
    _qkd_section(lines)
    _bucket_section(lines)
    lines.append("## Multi30k de-en\n")
    _translation_section(lines)
    lines.append("## Training cost\n")
    _training_cost_section(lines)
    lines.append("## Inference speed\n")
    _inference_section(lines)
    lines.append("## Int4 runtime\n")
    _int4_section(lines)
    lines.append("## Core speed\n")
    _timing_section(lines)
    notes = HERE / "missed_goals.md"  # written by hand: what was tried where a goal is missed
    if notes.exists():
        lines.append(notes.read_text().rstrip() + "\n")
    path = HERE / "REPORT.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
