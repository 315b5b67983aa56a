"""The smtp-edge tests: their modules may import each other's helpers (the in-test policy and
auth servicers, the edge as the service runs it), as ``from test_smtp_edge import ...``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
