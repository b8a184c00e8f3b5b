"""``qdistill-onmt-train`` / ``qdistill-onmt-translate``: OpenNMT-py's own entry points with
the plugin active, for users who prefer not to rely on the start-up file."""

from __future__ import annotations

import os

from onmt_plugin import bootstrap


def _activate() -> None:
    os.environ.setdefault(bootstrap.ENV_SWITCH, "1")
    if os.environ[bootstrap.ENV_SWITCH] == "0":
        os.environ[bootstrap.ENV_SWITCH] = "1"  # asking for this command means asking for it
    bootstrap.install()


def train() -> None:
    _activate()
    from onmt.bin.train import main

    main()


def translate() -> None:
    _activate()
    from onmt.bin.translate import main

    main()
