"""``qdistill shrink vision|onmt``: depth-shrink teacher checkpoints to initialise students."""

from __future__ import annotations

import argparse
import json

FORCE_HELP = "replace OUTPUT if it is an earlier `qdistill shrink` output (never anything else)"


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
    vision.add_argument("--force", action="store_true", help=FORCE_HELP)
    vision.set_defaults(func=_shrink_vision)
    onmt = sub.add_parser("onmt", help="OpenNMT-py checkpoint (LSTM or transformer)")
    onmt.add_argument("--checkpoint", required=True)
    onmt.add_argument("--enc-layers", type=int, default=None)
    onmt.add_argument("--dec-layers", type=int, default=None)
    onmt.add_argument("--enc-select", default="first", help="first | even | LIST like 0,2")
    onmt.add_argument("--dec-select", default="first", help="first | even | LIST like 0,2")
    onmt.add_argument("-o", "--output", required=True)
    onmt.add_argument("--force", action="store_true", help=FORCE_HELP)
    onmt.set_defaults(func=_shrink_onmt)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _check_input(path: str) -> None:
    from pathlib import Path

    from compressor.cli import UsageError

    if Path(path).is_dir():
        raise UsageError(f"--checkpoint {path} is a directory; pass the teacher's checkpoint file")
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass the teacher file to --checkpoint")


def _check_output(args: argparse.Namespace):
    from compressor.format.files import check_output, written_by
    from recipes.shrink_vision import SHRINK

    return check_output(
        args.output,
        [args.checkpoint],
        force=args.force,
        ours=lambda p: written_by(p) == SHRINK,
        what="qdistill shrink",
    )


def _shrink_vision(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.shrink_vision import (
        RESNET_LAYOUTS,
        VGG_ARCHS,
        load_state,
        save_references_checkpoint,
        shrink_resnet,
        shrink_vgg,
        stage_selections,
    )

    _check_input(args.checkpoint)
    if args.arch not in RESNET_LAYOUTS and args.arch not in VGG_ARCHS:
        known = sorted(RESNET_LAYOUTS) + list(VGG_ARCHS)
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {known}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be 1 or more, got {args.num_classes}")
    if args.arch in VGG_ARCHS:
        if args.layers is None:
            raise UsageError(f"{args.arch} is shrunk by conv layers: pass --layers N")
        if args.blocks is not None:
            raise UsageError(f"{args.arch} is a VGG: pass --layers N, not --blocks")
    else:
        if args.blocks is None:
            raise UsageError(f"{args.arch} is shrunk by blocks per stage: pass --blocks")
        if args.layers is not None:
            raise UsageError(f"{args.arch} is a ResNet: pass --blocks like 2,2,2,2, not --layers")
        try:
            blocks = [int(b) for b in args.blocks.split(",")]
        except ValueError:
            raise UsageError(
                f"--blocks must be integers like 2,2,2,2, got {args.blocks!r}"
            ) from None
        try:  # the request against the architecture, before any file is read or written
            stage_selections(RESNET_LAYOUTS[args.arch][1], blocks, args.select)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    output = _check_output(args)
    try:
        state = load_state(args.checkpoint)
        if args.arch in VGG_ARCHS:
            student, summary = shrink_vgg(
                state, args.arch, args.layers, args.select, args.num_classes
            )
        else:
            student, summary = shrink_resnet(
                state,
                args.arch,
                blocks,
                select=args.select,
                num_classes=args.num_classes,
                cifar_stem=args.cifar_stem,
            )
    except ValueError as exc:  # also compressor.format.files.CheckpointError
        raise UsageError(str(exc)) from None
    save_references_checkpoint(student, summary, output)
    print(json.dumps({**summary, "output": args.output}))
    return 0


def _shrink_onmt(args: argparse.Namespace) -> int:
    from compressor.cli import UsageError
    from recipes.shrink_onmt import shrink_onmt_file

    _check_input(args.checkpoint)
    if args.enc_layers is None and args.dec_layers is None:
        raise UsageError("nothing to shrink: pass --enc-layers and/or --dec-layers")
    for flag, value in (("--enc-layers", args.enc_layers), ("--dec-layers", args.dec_layers)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be 1 or more, got {value}")
    try:
        summary = shrink_onmt_file(
            args.checkpoint,
            args.output,
            force=args.force,
            enc_layers=args.enc_layers,
            dec_layers=args.dec_layers,
            enc_select=args.enc_select,
            dec_select=args.dec_select,
        )
    except ValueError as exc:  # also CheckpointError, and OutputError from its check_output
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
    from recipes.translation import CorpusError

    try:
        recipe = load_recipe(args.name)
        smoke = " (smoke)" if args.smoke else ""
        output = args.output_dir or f"runs/{recipe.name}-{args.scale}{'-smoke' if smoke else ''}"
        print(f"recipe {recipe.name}, {args.scale} scale{smoke} -> {output}", flush=True)
        result = run_recipe(recipe, args.scale, output, smoke=args.smoke, data_root=args.data_path)
    except (RecipeError, CorpusError, FileNotFoundError, PermissionError) as exc:
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
    run.add_argument(
        "--scale", default="cpu", help="one of the recipe's scales (`qdistill recipe list`)"
    )
    run.add_argument("--smoke", action="store_true", help="a few steps of everything")
    run.add_argument("--output-dir", help="where results go (default runs/NAME-SCALE)")
    run.add_argument("--data-path", help="data root (default: $QDISTILL_DATA or ../shared/data)")
    run.set_defaults(func=_recipe_run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
