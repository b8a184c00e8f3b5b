"""Packaging hooks; the metadata is in setup.cfg.

The OpenNMT-py plugin needs its start-up file ``qdistill_onmt.pth`` in site-packages. It is
put at the root of every wheel this project builds (regular and editable), so every standard
install route (``pip install .``, ``pip install -e .``, a wheel) installs it, pip lists it in
the package's RECORD, and ``pip uninstall qdistill`` removes it.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# onmt_plugin/install.py imports only the standard library: read the line from it.
_INSTALL = runpy.run_path(str(HERE / "onmt_plugin" / "install.py"))
PTH_NAME: str = _INSTALL["PTH_NAME"]
PTH_LINE: str = _INSTALL["PTH_LINE"]


def _write_pth(folder: str | Path) -> str:
    path = Path(folder, PTH_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PTH_LINE.encode("ascii"))  # site reads .pth files in the locale encoding
    return str(path)


class BuildPyWithPth(build_py):
    """build_py that also puts the start-up file at the root of build_lib (so of the wheel)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            _write_pth(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib, PTH_NAME)))
        return outputs


cmdclass: dict[str, type] = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64: PEP 660 editable wheels
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None

if editable_wheel is not None:

    class EditableWheelWithPth(editable_wheel):
        """An editable wheel holds only the import hooks of the editable install, not
        build_lib: add the start-up file to the files it unpacks into site-packages."""

        def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
            result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
            _write_pth(unpacked_wheel)
            return result

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
