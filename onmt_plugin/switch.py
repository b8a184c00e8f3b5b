"""The plugin's switches, read by the start-up bootstrap and by the hooks alike."""

from __future__ import annotations

import os

ENV_SWITCH = "QDISTILL_ONMT_PLUGIN"
# Set in an onmt_train process (and so inherited by the workers it spawns): there, a
# quantized-distillation run that cannot start is reported as one line, exit status 2.
CONSOLE_ENV = "QDISTILL_ONMT_CONSOLE"


def enabled() -> bool:
    """Whether the plugin is on (``QDISTILL_ONMT_PLUGIN`` is not ``0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"
