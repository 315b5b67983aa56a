"""The common library's tests: their modules may import each other's helpers (the mailbox
test's ``deliver`` and ``open_mailboxes``), as ``from test_mailbox import ...``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
