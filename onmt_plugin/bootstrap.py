"""Start-up hook: patch OpenNMT-py as its modules are imported, in any process.

OpenNMT-py has no plugin mechanism. The ``qdistill_onmt.pth`` file that
``python -m onmt_plugin.install`` puts in site-packages imports this module at interpreter
start. It imports nothing heavy: it only places a finder in front of ``sys.meta_path`` that
runs :mod:`onmt_plugin.hooks` right after the OpenNMT modules it patches are executed. This
works for ``onmt_train``, ``python -m onmt.bin.train`` and the processes OpenNMT spawns.

``QDISTILL_ONMT_PLUGIN=0`` switches it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

PATCHED_MODULES = ("onmt.opts", "onmt.train_single", "onmt.trainer", "onmt.models.model_saver")
ENV_SWITCH = "QDISTILL_ONMT_PLUGIN"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self.wrapped = wrapped

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self.wrapped.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.wrapped.exec_module(module)
        from onmt_plugin import hooks

        hooks.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name not in PATCHED_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder in place (once); a no-op when switched off."""
    if not enabled() or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
