"""The validation layer at the CLI's edges: numbers, input files and output paths, checked before any model
loads, each failure one line that says what to do (FeatspecError or an argparse error: exit code 2)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from featspec.errors import FeatspecError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (no upper bound without hi)."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}" if hi is None
                                             else f"must be in [{lo}, {hi}], got {value}")
        return value

    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63 - 1], got {value}")
    return value


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse type: a finite float in [lo, hi] ((lo, hi] with lo_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if low_bad or (hi is not None and value > hi):
            if hi is None:
                raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}], got {value:g}")
        return value

    return parse


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file the user named, or one line saying why it cannot be read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FeatspecError(f"{what} {path} does not exist")
    if p.is_dir():
        raise FeatspecError(f"{what} {path} is a directory: pass a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FeatspecError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeatspecError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                            "save it as UTF-8") from None


def check_destination(path: str | Path, what: str = "output", directory: bool = False) -> Path:
    """Before anything is computed: the parent of `path` exists, is a directory and is writable, and `path`
    is not a directory (for a file) or a file (for a directory)."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise FeatspecError(f"{what} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeatspecError(f"{what} {path}: {existing} is not writable: choose another location")
    if p.exists():
        if directory and not p.is_dir():
            raise FeatspecError(f"{what} {path} is a file: pass a directory")
        if not directory and p.is_dir():
            raise FeatspecError(f"{what} {path} is a directory: pass a file name")
        if not os.access(p, os.W_OK):
            raise FeatspecError(f"{what} {path} is not writable: choose another location")
    return p
