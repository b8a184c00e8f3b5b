"""The start-up file that activates the plugin in every Python process of the environment.

Installing qdistill by any route (``pip install .``, ``pip install -e .``, a wheel) puts
``qdistill_onmt.pth`` in site-packages: the wheel carries it at its root (see ``setup.py``), so
pip lists it in the package's RECORD and ``pip uninstall qdistill`` removes it.
``python -m onmt_plugin.install`` reports where it is, and writes it again if it is missing or
out of date; ``--uninstall`` removes it. ``qdistill doctor`` says whether it is active.

This module imports only the standard library: ``setup.py`` reads :data:`PTH_LINE` from it.
"""

from __future__ import annotations

import argparse
import site
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "qdistill_onmt.pth"
ENV_SWITCH = "QDISTILL_ONMT_PLUGIN"  # onmt_plugin.switch.ENV_SWITCH; setup.py reads this file alone

# Python executes a .pth line that starts with "import" in every process, at start-up. This one
# reads the switch with ``os`` alone (site has imported it) and puts a stub finder first in
# sys.meta_path (once: site may read a folder twice, through lib and lib64). The stub imports
# nothing until a module named onmt or onmt.* is imported, then hands over to
# onmt_plugin.bootstrap.find_spec. With the switch off, the stub is only installed in processes
# whose command names onmt (or that run a module with -m), so that onmt_train can refuse a run
# that asks for qdistill options it would silently ignore.
PTH_LINE = (
    "import os, sys; "
    f'(os.environ.get("{ENV_SWITCH}", "1") != "0" '
    'or "onmt" in "".join(getattr(sys, "argv", [])[:1]) '
    'or getattr(sys, "argv", [])[:1] == ["-m"]) '
    'and not any(hasattr(f, "_qdistill_onmt_hook") for f in sys.meta_path) '
    'and sys.meta_path.insert(0, type("qdistill_onmt_hook", (), {"_qdistill_onmt_hook": True, '
    '"find_spec": staticmethod(lambda name, *args: (name == "onmt" or name[:5] == "onmt.") '
    'and __import__("onmt_plugin.bootstrap").bootstrap.find_spec(name, *args) or None)})())\n'
)


def pth_path() -> Path:
    """Where this environment's installation puts the start-up file."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def installed() -> list[Path]:
    """The start-up files present in the site directories this interpreter reads."""
    folders = [Path(sysconfig.get_paths()["purelib"])]
    folders += [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        folders.append(Path(site.getusersitepackages()))
    found: list[Path] = []
    for folder in folders:
        path = folder / PTH_NAME
        if path.is_file() and not any(path.samefile(p) for p in found):
            found.append(path)
    return found


def is_current(path: Path) -> bool:
    try:
        return path.read_text() == PTH_LINE
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Report, repair or remove the start-up file of the OpenNMT-py plugin "
        "(installing qdistill installs it; pip uninstall removes it)."
    )
    parser.add_argument("--uninstall", action="store_true", help="remove the start-up file")
    args = parser.parse_args(argv)
    if args.uninstall:
        for path in installed() or [pth_path()]:
            path.unlink(missing_ok=True)
            print(f"removed {path}")
        return 0
    current = [p for p in installed() if is_current(p)]
    if current:
        print(f"installed: {current[0]} (switch off with {ENV_SWITCH}=0; check: qdistill doctor)")
        return 0
    from compressor.format.files import atomic_write_text

    path = pth_path()
    atomic_write_text(path, PTH_LINE)
    print(f"wrote {path} (switch off with {ENV_SWITCH}=0; check: qdistill doctor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
