"""Start-up hook: patch OpenNMT-py as its modules are imported, in any process.

OpenNMT-py has no plugin mechanism. Installing qdistill puts the start-up file
``qdistill_onmt.pth`` in site-packages (see :mod:`onmt_plugin.install`); Python runs its one
line in every process of the environment, so that line does almost nothing: it reads the off
switch ``QDISTILL_ONMT_PLUGIN`` with ``os`` alone and puts a stub finder first in
``sys.meta_path``, importing nothing. Only when a module named ``onmt`` or ``onmt.*`` is
imported does the stub import this module and call :func:`find_spec`, which

- runs :mod:`onmt_plugin.hooks` right after each OpenNMT module that it patches is executed
  (``onmt_train``, ``python -m onmt.bin.train`` and the processes OpenNMT spawns alike);
- in an ``onmt_train`` process, before ``onmt.bin.train`` runs, checks that a run which names
  qdistill options (command line or ``-config`` YAML) can have them: with the plugin switched
  off, or with an OpenNMT-py it cannot patch, such a run stops with one line (exit 2) instead
  of training a plain fp32 model, because OpenNMT ignores options it does not know.

With the switch off, the stub is only installed in processes whose command names ``onmt``
(or runs a module with ``-m``), for that check; nothing is patched.

This module imports nothing beyond ``os``, ``sys`` and the tiny :mod:`onmt_plugin.switch`.
"""

from __future__ import annotations

import os
import sys

from onmt_plugin.switch import CONSOLE_ENV, enabled

PATCHED_MODULES = frozenset(
    {
        "onmt.opts",
        "onmt.train_single",
        "onmt.trainer",
        "onmt.models.model_saver",
        "onmt.bin.translate",
        "onmt.model_builder",
    }
)
TRAIN_ENTRY = "onmt.bin.train"
HOOK_MARK = "_qdistill_onmt_hook"  # attribute of the finders that lead here
TRAIN_PROGRAMS = ("onmt_train", "qdistill-onmt-train")


def is_train_process() -> bool:
    """Whether this process is ``onmt_train`` (or ``qdistill-onmt-train``,
    ``python -m onmt.bin.train``, ``python .../onmt/bin/train.py``)."""
    argv = getattr(sys, "argv", None) or [""]
    program = os.path.basename(argv[0])
    if os.path.splitext(program)[0] in TRAIN_PROGRAMS:
        return True
    if argv[0].endswith(os.path.join("onmt", "bin", "train.py")):
        return True
    # python [options] -m onmt.bin.train: sys.argv[0] is "-m" until runpy has found the module.
    original = list(getattr(sys, "orig_argv", None) or ())
    i = 1
    while i < len(original):
        arg = original[i]
        if arg == "-m":
            return original[i + 1 : i + 2] == [TRAIN_ENTRY]
        if arg.startswith("-m"):
            return arg[2:] == TRAIN_ENTRY
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # options that take a value
            i += 2
            continue
        if arg in ("-c", "-") or not arg.startswith("-"):  # code, stdin or a script
            return False
        i += 1
    return False


def hook_installed() -> bool:
    """Whether a finder that leads here is in ``sys.meta_path`` (the start-up file's stub, or
    :func:`install`)."""
    return any(getattr(finder, HOOK_MARK, False) for finder in sys.meta_path)


def find_spec(name, path=None, target=None):
    """The finder's work for ``onmt`` and ``onmt.*`` modules: None (let the other finders
    find it), or the spec of a module to patch with a loader that patches it."""
    if name == TRAIN_ENTRY:
        if is_train_process():
            os.environ[CONSOLE_ENV] = "onmt_train"
            from onmt_plugin.hooks import guard_train_run

            guard_train_run()  # raises SystemExit(2), after one line, for a run it must stop
        return None
    if name not in PATCHED_MODULES or not enabled():
        return None
    for finder in sys.meta_path:
        if getattr(finder, HOOK_MARK, False) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path, target)
        if spec is not None:
            if hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
    return None


class _PatchingLoader:
    """The module's own loader, followed by :func:`onmt_plugin.hooks.patch`."""

    def __init__(self, wrapped) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        from onmt_plugin import hooks

        hooks.patch(module)


class _Hook:
    """A meta-path finder (duck-typed: no ``importlib.abc``) that reacts to ``onmt`` only."""

    _qdistill_onmt_hook = True

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "onmt" or name[:5] == "onmt.":
            return find_spec(name, path, target)
        return None


def install() -> None:
    """Put the finder in place (once), for processes started without the start-up file
    (``qdistill-onmt-train``); the switch is read when an onmt module is imported."""
    if not hook_installed():
        sys.meta_path.insert(0, _Hook())
