"""``qdistill shrink vision|onmt``: depth-shrink teacher checkpoints to initialise students."""

from __future__ import annotations

import argparse
import json


def register_shrink(subparsers) -> None:
    parser = subparsers.add_parser("shrink", help="shrink the depth of a teacher checkpoint")
    sub = parser.add_subparsers(dest="shrink_kind", metavar="KIND")
    vision = sub.add_parser("vision", help="torchvision ResNet / WideResNet / VGG checkpoint")
    vision.add_argument("--arch", required=True, help="teacher architecture, e.g. resnet34")
    vision.add_argument("--checkpoint", required=True, help="teacher state dict or references ckpt")
    vision.add_argument("--blocks", help="ResNet: blocks per stage, e.g. 2,2,2,2")
    vision.add_argument("--layers", type=int, help="VGG: conv layers to keep, e.g. 6")
    vision.add_argument(
        "--select",
        default="first",
        help="first | even | ResNet per-stage lists '0,1/0,3/0,2/0,2' | VGG list '0,1,2,4,6,7'",
    )
    vision.add_argument("--num-classes", type=int, default=None)
    vision.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem, no maxpool")
    vision.add_argument("-o", "--output", required=True)
    vision.set_defaults(func=_shrink_vision)
    onmt = sub.add_parser("onmt", help="OpenNMT-py checkpoint (LSTM or transformer)")
    onmt.add_argument("--checkpoint", required=True)
    onmt.add_argument("--enc-layers", type=int, default=None)
    onmt.add_argument("--dec-layers", type=int, default=None)
    onmt.add_argument("--enc-select", default="first", help="first | even | LIST like 0,2")
    onmt.add_argument("--dec-select", default="first", help="first | even | LIST like 0,2")
    onmt.add_argument("-o", "--output", required=True)
    onmt.set_defaults(func=_shrink_onmt)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _check_input(path: str):
    from pathlib import Path

    from compressor.cli import UsageError

    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass the teacher file to --checkpoint")


def _shrink_vision(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.shrink_vision import (
        RESNET_LAYOUTS,
        VGG_ARCHS,
        load_state,
        save_references_checkpoint,
        shrink_resnet,
        shrink_vgg,
    )

    _check_input(args.checkpoint)
    if args.arch not in RESNET_LAYOUTS and args.arch not in VGG_ARCHS:
        known = sorted(RESNET_LAYOUTS) + list(VGG_ARCHS)
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {known}")
    try:
        if args.arch in VGG_ARCHS:
            if args.layers is None:
                raise UsageError(f"{args.arch} is shrunk by conv layers: pass --layers N")
            student, summary = shrink_vgg(
                load_state(args.checkpoint), args.arch, args.layers, args.select,
                args.num_classes,
            )  # fmt: skip
        else:
            if args.blocks is None:
                raise UsageError(f"{args.arch} is shrunk by blocks per stage: pass --blocks")
            try:
                blocks = [int(b) for b in args.blocks.split(",")]
            except ValueError:
                raise UsageError(
                    f"--blocks must be integers like 2,2,2,2, got {args.blocks!r}"
                ) from None
            student, summary = shrink_resnet(
                load_state(args.checkpoint),
                args.arch,
                blocks,
                select=args.select,
                num_classes=args.num_classes,
                cifar_stem=args.cifar_stem,
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    save_references_checkpoint(student, summary, args.output)
    print(json.dumps({**summary, "output": args.output}))
    return 0


def _shrink_onmt(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.shrink_onmt import shrink_onmt_file

    _check_input(args.checkpoint)
    if args.enc_layers is None and args.dec_layers is None:
        raise UsageError("nothing to shrink: pass --enc-layers and/or --dec-layers")
    try:
        summary = shrink_onmt_file(
            args.checkpoint,
            args.output,
            enc_layers=args.enc_layers,
            dec_layers=args.dec_layers,
            enc_select=args.enc_select,
            dec_select=args.dec_select,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps({**summary, "output": args.output}))
    return 0


def _recipe_list(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.experiments import RecipeError, list_recipes

    try:
        recipes = list_recipes()
    except RecipeError as exc:
        raise UsageError(str(exc)) from None
    for recipe in recipes:
        print(f"{recipe.name:<10} [{recipe.engine}; scales: {', '.join(recipe.scales)}]")
        print(f"           {recipe.description}")
    return 0


def _recipe_run(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.experiments import RecipeError, load_recipe, run_recipe

    try:
        recipe = load_recipe(args.name)
        smoke = " (smoke)" if args.smoke else ""
        output = args.output_dir or f"runs/{recipe.name}-{args.scale}{'-smoke' if smoke else ''}"
        print(f"recipe {recipe.name}, {args.scale} scale{smoke} -> {output}", flush=True)
        result = run_recipe(recipe, args.scale, output, smoke=args.smoke, data_root=args.data_path)
    except (RecipeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # a training or evaluation tool failed; its log says why
        raise UsageError(str(exc)) from None
    print(f"wrote {output}/result.json ({len(result['rows'])} results, {result['seconds']:.0f} s)")
    return 0


def register_recipe(subparsers) -> None:
    parser = subparsers.add_parser("recipe", help="run the paper's experiments (list, run)")
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION")
    listing = sub.add_parser("list", help="the recipes and their scales")
    listing.set_defaults(func=_recipe_list)
    run = sub.add_parser("run", help="run (or resume) one recipe")
    run.add_argument("name", help="recipe name (see `qdistill recipe list`) or a YAML file")
    run.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    run.add_argument("--smoke", action="store_true", help="a few steps of everything")
    run.add_argument("--output-dir", help="where results go (default runs/NAME-SCALE)")
    run.add_argument("--data-path", help="data root (default: $QDISTILL_DATA or ../shared/data)")
    run.set_defaults(func=_recipe_run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
