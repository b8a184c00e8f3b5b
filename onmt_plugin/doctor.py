"""``qdistill doctor``: is the OpenNMT-py plugin installed and active, which OpenNMT-py is
there, and what the plugin patched in it. Exit status 0 when ``onmt_train
-quantized_distill`` will work in this environment, 1 otherwise (each problem says why)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

COMMAND = "doctor"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="check the OpenNMT-py plugin: start-up hook, OpenNMT-py version, what it patched",
        description=__doc__,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


def report() -> tuple[list[str], bool]:
    """The lines of the report, and whether a quantized-distillation run will work."""
    from onmt_plugin import bootstrap, install, switch

    lines: list[str] = []
    problems: list[str] = []
    found = install.installed()
    current = [p for p in found if install.is_current(p)]
    if current:
        lines.append(f"start-up file: {current[0]}")
    elif found:
        lines.append(f"start-up file: {found[0]} (out of date)")
        problems.append("the start-up file is out of date: reinstall qdistill")
    else:
        lines.append(f"start-up file: not installed (expected {install.pth_path()})")
        problems.append(
            "the start-up file is missing: reinstall qdistill (pip install .), or run "
            "python -m onmt_plugin.install"
        )
    if switch.enabled():
        lines.append(f"switch: on ({switch.ENV_SWITCH} is not 0)")
    else:
        lines.append(f"switch: off ({switch.ENV_SWITCH}=0)")
        problems.append(
            f"the plugin is switched off: onmt_train refuses qdistill options; unset "
            f"{switch.ENV_SWITCH}, or run qdistill-onmt-train"
        )
    active = bootstrap.hook_installed() and switch.enabled()
    lines.append(f"hook active in this process: {'yes' if active else 'no'}")
    if switch.enabled() and current and not active:
        problems.append("the start-up file did not run in this process (not in a site folder?)")
    if importlib.util.find_spec("onmt") is None:
        lines.append("OpenNMT-py: not installed (pip install --no-deps OpenNMT-py==3.5.1)")
        problems.append("OpenNMT-py is not installed")
        return _finish(lines, problems)
    lines += _onmt_lines(active, problems)
    return _finish(lines, problems)


def _onmt_lines(active: bool, problems: list[str]) -> list[str]:
    from onmt_plugin import hooks

    lines = []
    with open(os.devnull, "w") as quiet:  # OpenNMT's import warnings are not the report
        stderr, sys.stderr = sys.stderr, quiet
        try:
            import onmt

            hooks.import_targets()
            import onmt.bin.translate  # noqa: F401
        except Exception as exc:
            problems.append(f"OpenNMT-py cannot be imported ({type(exc).__name__}: {exc})")
        finally:
            sys.stderr = stderr
    version_problem = hooks.version_problem()
    lines.append(
        f"OpenNMT-py: {hooks.onmt_version() or 'unknown version'} "
        f"({'supported' if version_problem is None else 'NOT supported'}; "
        f"the plugin supports {hooks.SUPPORTED_TEXT})"
    )
    if version_problem is not None:
        problems.append(f"{version_problem}: the plugin leaves it untouched")
    lines.append("patch targets (module: state; the names it needs):")
    states = hooks.status()
    for name, targets in {**hooks.TARGETS, **hooks.OPTIONAL_TARGETS}.items():
        module = sys.modules.get(name)
        if module is None:
            state = "cannot be imported"
        elif states[name] == hooks.PATCHED:
            state = "patched"
        elif name in hooks._status:
            state = states[name]
        else:
            state = "not patched (imported without the hook)"
        missing = hooks.missing_targets(module, targets) if module is not None else []
        shown = ", ".join(
            f"{t} MISSING" if hooks.is_missing(f"{name}.{t}", missing) else t for t in targets
        )
        lines.append(f"  {name}: {state}; {shown}")
        if name in hooks.TARGETS and state != "patched" and active:
            problems.append(f"{name}: {state}")
    return lines


def _finish(lines: list[str], problems: list[str]) -> tuple[list[str], bool]:
    if problems:
        lines.append("onmt_train -quantized_distill: will NOT work here:")
        lines += [f"  - {p}" for p in dict.fromkeys(problems)]
    else:
        lines.append("onmt_train -quantized_distill: ready")
    return lines, not problems
