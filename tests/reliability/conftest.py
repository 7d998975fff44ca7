"""The shared fixtures of ``tests/`` (``snn_fixtures``, ``ddp_run``) importable from here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
