"""Install (or remove) the start-up file that activates the plugin in every Python process of
this environment: ``python -m onmt_plugin.install [--uninstall]``. ``make`` runs it."""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

PTH_NAME = "qdistill_onmt.pth"
# A .pth line starting with "import" is executed at start-up; keep it to the tiny bootstrap.
PTH_LINE = "import onmt_plugin.bootstrap as _qd; _qd.install()\n"


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uninstall", action="store_true")
    args = parser.parse_args(argv)
    path = pth_path()
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(PTH_LINE)
    tmp.replace(path)
    print(f"installed {path} (switch off with QDISTILL_ONMT_PLUGIN=0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
