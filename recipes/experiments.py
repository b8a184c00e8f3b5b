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

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

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
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    missing = [k for k in ("name", "engine", "data", "scales") if k not in raw]
    if missing:
        raise RecipeError(f"{path}: missing {', '.join(missing)}")
    if raw["engine"] not in ENGINES:
        raise RecipeError(f"{path}: engine must be one of {ENGINES}, got {raw['engine']!r}")
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
    return config_class(**values)


def run_recipe(
    recipe: Recipe,
    scale: str,
    output_dir: str | os.PathLike,
    smoke: bool = False,
    data_root: str | os.PathLike | None = None,
) -> dict:
    """Run (or finish) a recipe; returns what it writes to ``output_dir/result.json``."""
    from recipes.small_runs import data_root as default_root

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        rows = translation.run(corpus, config, out / "work")["rows"]
    result = {
        "recipe": recipe.name,
        "description": recipe.description,
        "scale": scale,
        "smoke": smoke,
        "parameters": parameters,
        "data": str(data / recipe.data),
        "rows": rows,
        "seconds": time.time() - started,
        "environment": environment(),
    }
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "result.json")
    return result
