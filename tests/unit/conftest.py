"""Unit tests run without Ray (the shard set and trained experiment they share are fixtures of
tests/conftest.py, made without Ray too).

Unit tests never need Ray: ``make test`` runs them first with ``CXR_RAY_BLOCK_RAY=1``, under
which ``import ray`` fails (as on a machine without Ray), so a stray import cannot hide.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("CXR_RAY_BLOCK_RAY") == "1":
    sys.modules["ray"] = None  # type: ignore[assignment]  # `import ray` raises ImportError

