"""``qdistill-onmt-train`` / ``qdistill-onmt-translate``: OpenNMT-py's own entry points with
the plugin active, for users who prefer not to rely on the start-up file."""

from __future__ import annotations

import os

from onmt_plugin import bootstrap, switch


def _activate() -> None:
    # Asking for this command means asking for the plugin, whatever the switch says; the
    # hook reads the switch when OpenNMT is imported, below.
    os.environ[switch.ENV_SWITCH] = "1"
    bootstrap.install()


def train() -> None:
    _activate()
    from onmt.bin.train import main

    main()


def translate() -> None:
    _activate()
    from onmt.bin.translate import main

    main()
