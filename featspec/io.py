"""Where featspec keeps derived files, and the atomic JSON writer every report and cache goes through."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """Where featspec keeps derived artifacts; FEATSPEC_CACHE overrides the default."""
    return Path(os.environ.get("FEATSPEC_CACHE", Path.home() / ".cache" / "featspec"))


def write_json(report: dict, path: str | Path) -> None:
    """Atomic write: a crash never leaves a truncated file (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
