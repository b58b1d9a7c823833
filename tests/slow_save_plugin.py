"""Test-only plugin (``--plugins slow_save_plugin``): makes the kill of a rank land inside ``save_checkpoint``.

After DeepSpeed has written the engine files of the checkpoint tagged ``$FPO_TEST_SLOW_SAVE_TAG``, each rank writes
``$FPO_TEST_SLOW_SAVE_MARKER.<pid>`` and sleeps, so that a test can SIGKILL it from outside while the checkpoint is
half written (no RNG files, no ``fpo_state.json``, ``latest`` still naming the previous one).  Production code
has no fault hook: this module patches ``Engine.save`` in the rank that imports it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fpo_dist.engine as _engine

_real_save = _engine.Engine.save


def _slow_save(self, directory: str, tag: str, client_state: dict) -> None:
    _real_save(self, directory, tag, client_state)
    if tag == os.environ.get("FPO_TEST_SLOW_SAVE_TAG"):
        Path(f"{os.environ['FPO_TEST_SLOW_SAVE_MARKER']}.{os.getpid()}").write_text(str(os.getpid()))
        time.sleep(600)


_engine.Engine.save = _slow_save
