"""Where featspec keeps derived files, and the one atomic writer every report, plot, checkpoint and cache goes
through: it checks the destination first, writes a temp file beside it, then renames, so a crash or Ctrl-C
never leaves a truncated file or a stray temp file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from featspec.validate import check_destination


def cache_root() -> Path:
    """Where featspec keeps derived artifacts; FEATSPEC_CACHE overrides the default."""
    return Path(os.environ.get("FEATSPEC_CACHE", Path.home() / ".cache" / "featspec"))


def atomic_write(path: str | Path, write: Callable[[Path], None], what: str = "output") -> Path:
    """Call `write(tmp)` on a temp file in the destination's directory, then rename it to `path`."""
    path = check_destination(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_dir_write(out: str | Path, write: Callable[[Path], None]) -> None:
    """Write a directory (a head, a checkpoint) into a temp dir beside `out`, then swap it in: a killed save
    never leaves half of it, and the previous version survives as `out.old` until the swap is done."""
    out = check_destination(out, "output", directory=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a head is read by servers running as other users
    try:
        write(tmp)
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(report, path: str | Path, indent: int = 2, default=None) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=indent, default=default)

    atomic_write(path, write)


def write_text(text: str, path: str | Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG (the format named explicitly: the temp name's suffix is the final one)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def torch_save(obj, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
