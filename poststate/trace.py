"""An opt-in event trace for checking data parallelism: with POSTSTATE_TRACE_DIR set, each process appends
JSON lines to `<dir>/rank<r>.jsonl` (what it drew at each step, the LR it stepped with, which outputs it
wrote). Unset (the default), nothing is written and nothing changes: it is a test and debugging aid."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "POSTSTATE_TRACE_DIR"


def trace(event: str, **fields: Any) -> None:
    """Append {"event", "rank", "pid", **fields} to this process's trace file, when tracing is on."""
    root = os.environ.get(ENV)
    if not root:
        return
    rank = int(os.environ.get("RANK", "0"))
    path = Path(root) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "rank": rank, "pid": os.getpid(), **fields}, sort_keys=True) + "\n")
