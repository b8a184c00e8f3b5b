"""Experiment recipes: the paper's settings as config files, one command each.

A recipe (``recipes/configs/NAME.yaml``) names an engine (``cifar``: :mod:`recipes.cifar`;
``translation``: :mod:`recipes.translation`, the stock OpenNMT-py tools with the plugin), the
data folder under the data root, and the engine's parameters at two scales: ``cpu`` (about an
hour on two cores) and ``paper`` (a GPU machine); ``smoke`` overrides them with a few steps.

    qdistill recipe list
    qdistill recipe run multi30k --scale cpu --output-dir runs/multi30k

A run writes ``result.json`` in the output folder (metrics, file sizes in bytes, the
parameters, versions and machine) and keeps every intermediate result there: run the same
command again after an interruption and it continues where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from compressor.format.files import atomic_write_json
from compressor.quantization.grids import check_bits
from recipes.environment import environment

CONFIGS = Path(__file__).resolve().parent / "configs"
ENGINES = ("cifar", "translation")
SCALES = ("cpu", "paper")


class RecipeError(ValueError):
    """A recipe that does not exist or does not make sense; the message says which."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    engine: str
    data: str
    scales: Mapping[str, Mapping]
    smoke: Mapping
    corpus: Mapping
    path: Path

    def parameters(self, scale: str, smoke: bool = False) -> dict:
        if scale not in self.scales:
            raise RecipeError(f"recipe {self.name} has no scale {scale!r}; use {list(self.scales)}")
        return {**self.scales[scale], **(self.smoke if smoke else {})}


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe by name (a file in ``recipes/configs``) or by the path of a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise RecipeError(f"no recipe {str(name_or_path)!r}; known recipes: {known}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file; a recipe is a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    missing = [k for k in ("name", "engine", "data", "scales") if k not in raw]
    if missing:
        raise RecipeError(f"{path}: missing {', '.join(missing)}")
    if raw["engine"] not in ENGINES:
        raise RecipeError(f"{path}: engine must be one of {ENGINES}, got {raw['engine']!r}")
    for key in ("name", "data"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise RecipeError(f"{path}: {key} must be a name, got {raw[key]!r}")
    scales = raw["scales"]
    if not isinstance(scales, dict) or not scales:
        raise RecipeError(f"{path}: scales must map scale names (cpu, paper) to parameters")
    for scale, parameters in scales.items():
        if not isinstance(parameters, dict):
            raise RecipeError(f"{path}: scales.{scale} must be a mapping of parameters")
    for key in ("smoke", "corpus"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise RecipeError(f"{path}: {key} must be a mapping")
    recipe = Recipe(
        name=raw["name"],
        description=" ".join(str(raw.get("description", "")).split()),
        engine=raw["engine"],
        data=raw["data"],
        scales=raw["scales"],
        smoke=raw.get("smoke") or {},
        corpus=raw.get("corpus") or {},
        path=path,
    )
    for scale in recipe.scales:
        _engine_config(recipe, recipe.parameters(scale))  # unknown parameters fail early
        _engine_config(recipe, recipe.parameters(scale, smoke=True))
    return recipe


def list_recipes() -> list[Recipe]:
    return [load_recipe(p) for p in sorted(CONFIGS.glob("*.yaml"))]


def _engine_config(recipe: Recipe, parameters: Mapping) -> object:
    if recipe.engine == "cifar":
        from recipes.small_runs import SmallRunConfig as config_class
    else:
        from recipes.translation import TranslationScale as config_class
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise RecipeError(
            f"{recipe.path}: unknown parameters {unknown} for the {recipe.engine} engine; "
            f"known: {sorted(known)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in parameters.items()}
    defaults = {f.name: f.default for f in fields(config_class)}
    for key, value in values.items():
        problem = _parameter_problem(key, value, defaults[key])
        if problem:
            raise RecipeError(f"{recipe.path}: parameter {key}: {problem}, got {parameters[key]!r}")
    return config_class(**values)


# Parameters that may be 0 (counts of steps) or are not counts at all; other integers are
# counts and sizes that must be 1 or more.
_MAY_BE_ZERO = {"seed", "steps"}
_PROBABILITIES = {"alpha", "distill_alpha", "dropout"}
_BITS = {"bits", "pm_bits", "dq_bits"}


def _parameter_problem(key: str, value: object, default: object) -> str | None:
    """What is wrong with one engine parameter (its type is that of the default), or None."""
    if key in ("train_pairs", "test_pairs") and value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if key == "device":
        import torch

        try:
            torch.device(str(value))
        except RuntimeError:
            return "must be a torch device such as cpu or cuda"
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return "must be a list of integers, like [2, 4]"
        if key in _BITS:
            try:
                for v in value:
                    check_bits(v, "bit widths")
            except ValueError as exc:
                return str(exc)
        if any(v < 1 for v in value):
            return "every entry must be 1 or more"
        return None
    if isinstance(default, str):
        return None if isinstance(value, str) and value else "must be a non-empty string"
    if isinstance(default, float):
        if isinstance(value, str):  # YAML reads 1e-3 as text (it wants 1.0e-3)
            return "must be a number (write 0.001 or 1.0e-3, not 1e-3)"
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return "must be a number"
        if key in _PROBABILITIES:
            return None if 0 <= value <= 1 else "must be from 0 to 1"
        return None if value > 0 else "must be greater than 0"
    if isinstance(default, int) or default is None:  # counts, sizes, the seed
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
        least = 0 if key in _MAY_BE_ZERO else 1
        return None if value >= least else f"must be {least} or more"
    return None


def run_recipe(
    recipe: Recipe,
    scale: str,
    output_dir: str | os.PathLike,
    smoke: bool = False,
    data_root: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
) -> dict:
    """Run (or finish) a recipe; returns what it writes to ``output_dir/result.json``.

    ``teacher``: translation recipes only, an existing trained OpenNMT-py checkpoint (with its
    sentencepiece models and vocabularies beside it) to compress instead of training one."""
    from recipes.small_runs import data_root as default_root

    out = Path(output_dir)
    data = Path(data_root) if data_root is not None else default_root()
    if not (data / recipe.data).is_dir():
        raise RecipeError(
            f"data folder {data / recipe.data} not found; set QDISTILL_DATA or --data-path "
            "to the folder that holds it"
        )
    parameters = recipe.parameters(scale, smoke)
    if recipe.engine == "translation":
        parameters = {"name": f"{scale} (smoke)" if smoke else scale, **parameters}
    config = _engine_config(recipe, parameters)
    if teacher is not None and recipe.engine != "translation":
        raise RecipeError(f"recipe {recipe.name}: an existing teacher is for translation recipes")
    device = str(getattr(config, "device", "cpu"))
    if getattr(config, "gpu", False) or device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(
                f"the {scale} scale of {recipe.name} trains on a GPU and none is available "
                "here; use --scale cpu"
            )
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise RecipeError(
                f"--output-dir {out}: {folder} is a file, not a folder; choose another --output-dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if recipe.engine == "cifar":
        from recipes import cifar

        rows = cifar.run(config, out / "results", out / "work", data_root=data)
    else:
        from recipes import translation

        corpus = translation.Corpus(
            data / recipe.data,
            recipe.corpus.get("src_lang", "src"),
            recipe.corpus.get("tgt_lang", "tgt"),
            **(
                {"names": {k: tuple(v) for k, v in recipe.corpus["names"].items()}}
                if "names" in recipe.corpus
                else {}
            ),
        )
        rows = translation.run(corpus, config, out / "work", teacher=teacher)["rows"]
    result = {
        "recipe": recipe.name,
        "description": recipe.description,
        "scale": scale,
        "smoke": smoke,
        "parameters": parameters,
        "existing_teacher": None if teacher is None else str(teacher),
        "data": str(data / recipe.data),
        "rows": rows,
        "seconds": time.time() - started,
        "environment": environment(),
    }
    atomic_write_json(out / "result.json", result)
    return result
