"""The one training loop every featspec trainer runs on: EAGLE heads, the cross-modal minis, adapters and head.

What a trainer supplies is its loss for one micro-batch (`micro_step(micro) -> (loss, stats)`, with batches
derived from the seed and the micro-batch index, so a resumed run sees exactly the data it would have) and
what its checkpoint holds beside the optimizer (`state()` / `load(blob)`). The loop owns the rest, the same for
all: gradient accumulation, clipping, the optimizer and schedule steps, a progress bar, and atomic checkpoints
(written to a temp directory and swapped in, so a kill never leaves half of one) with exact resume.

A checkpoint is a directory: `state.pt` (the trainer's tensors, optimizer, scheduler) and `meta.json` (the
run's record: step, micro-batches, wall time, the trainer's own records).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from featspec.io import atomic_dir_write


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor` of the peak at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def read_checkpoint(ckpt: Path) -> dict | None:
    """The blob of the checkpoint in `ckpt` with its meta under "meta", or None when there is none."""
    found = find_checkpoint(ckpt)
    if found is None:
        return None
    blob = torch.load(found / "state.pt", map_location="cpu", weights_only=False)
    if blob.get("meta") is None:  # a mini's checkpoint from before this loop kept its full record in state.pt
        blob["meta"] = json.loads((found / "meta.json").read_text())
    return blob


def find_checkpoint(ckpt: Path) -> Path | None:
    """`ckpt`, or `ckpt.old` when a kill fell between the two renames of a save, if it holds a checkpoint."""
    for p in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (p / "meta.json").exists() and (p / "state.pt").exists():
            return p
    return None


class Loop:
    """Optimizer steps over micro-batches, with checkpoints in `ckpt` (None: no checkpoints).

    `accel`: an accelerate `Accelerator` whose `prepare` wrapped `model` and `optimizer` (distributed runs and
    mixed precision); without it, plain PyTorch. `meta` is the run's JSON-able record; the loop keeps `step`,
    `micro` and `wall_s` in it, and a trainer may add its own keys (they are saved and restored with it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, params: Callable[[], list], *, total: int,
                 accumulation: int = 1, clip: float | None = None, ckpt: Path | None = None, save_every: int = 0,
                 state: Callable[[], dict] | None = None, desc: str = "train", progress: bool = True,
                 meta: dict | None = None, accel=None, model: torch.nn.Module | None = None):
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.total, self.accumulation, self.clip = total, accumulation, clip
        self.ckpt = None if ckpt is None else Path(ckpt)
        self.save_every = save_every
        self.state = state or dict
        self.desc, self.progress = desc, progress
        self.meta = meta if meta is not None else {}  # the caller's dict, kept: both sides see one record
        for key, value in (("step", 0), ("micro", 0), ("wall_s", 0.0)):
            self.meta.setdefault(key, value)
        self.accel, self.model = accel, model
        self.bar: tqdm | None = None

    @property
    def main(self) -> bool:
        """Is this the process that writes (the only one outside `accelerate launch`)?"""
        return self.accel is None or self.accel.is_main_process

    def resume(self, load: Callable[[dict], None] | None = None, optimizer: bool = True) -> dict | None:
        """Restore the checkpoint in `ckpt` if there is one: the trainer's part through `load(blob)`, the
        optimizer and scheduler (unless `optimizer` is False or the checkpoint has none), and the meta.
        Returns the checkpoint's blob, or None when there is nothing to resume."""
        blob = read_checkpoint(self.ckpt) if self.ckpt is not None else None
        if blob is None:
            return None
        if load is not None:
            load(blob)
        if optimizer:
            self.load_optimizer(blob)
        self.meta.update(blob["meta"])
        self.meta.setdefault("micro", self.meta["step"] * self.accumulation)
        return blob

    def load_optimizer(self, blob: dict) -> None:
        """The optimizer and scheduler state of a checkpoint, if it holds them."""
        if blob.get("optimizer") is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])

    def save(self, optimizer: bool = True) -> None:
        """Write the checkpoint atomically (without the optimizer: the next stage starts a fresh one)."""
        if self.ckpt is None or not self.main:
            return
        meta = self.meta

        def write(d: Path) -> None:
            blob = self.state()
            if optimizer:
                blob.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            torch.save(blob, d / "state.pt")
            (d / "meta.json").write_text(json.dumps(meta, indent=1))

        atomic_dir_write(self.ckpt, write)

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        (self.bar.write if self.bar is not None else print)(line)

    def run(self, micro_step: Callable[[int], tuple[torch.Tensor, dict] | None],
            after_step: Callable[[int, float, dict], dict | None] | None = None, stop_at: int | None = None,
            final_save: bool = True) -> dict:
        """Run until `stop_at` (default `total`) optimizer steps, or until `micro_step` returns None (data done).

        `after_step(step, loss, stats)` runs after every optimizer step (logging, evaluation) and may return
        the progress bar's postfix. Checkpoints are written every `save_every` steps and at the last one (unless
        `final_save` is False: a trainer moving to its next stage saves then, without this stage's optimizer)."""
        stop_at = self.total if stop_at is None else min(stop_at, self.total)
        meta = self.meta
        self.bar = tqdm(total=stop_at, initial=meta["step"], desc=self.desc, unit="step", dynamic_ncols=True,
                        disable=not (self.progress and self.main))
        started = time.perf_counter() - meta["wall_s"]
        try:
            while meta["step"] < stop_at:
                out = self._micro(micro_step)
                if out is None:
                    break
                loss, stats = out
                meta["micro"] += 1
                if meta["micro"] % self.accumulation:
                    continue
                self.scheduler.step()
                meta["step"] += 1
                meta["wall_s"] = time.perf_counter() - started
                postfix = after_step(meta["step"], loss, stats) if after_step is not None else None
                self.bar.update(1)
                if postfix:
                    self.bar.set_postfix(postfix)
                last = meta["step"] == stop_at
                if (last and final_save) or (not last and self.save_every and meta["step"] % self.save_every == 0):
                    self.save()
        finally:
            self.bar.close()
            self.bar = None
        return meta

    def _micro(self, micro_step) -> tuple[float, dict] | None:
        """One micro-batch: loss, backward, and at accumulation boundaries clip, optimizer step, zero grads."""
        accel = self.accel
        with accel.accumulate(self.model) if accel is not None else nullcontext():
            out = micro_step(self.meta["micro"])
            if out is None:
                return None
            loss, stats = out
            boundary = (self.meta["micro"] + 1) % self.accumulation == 0
            if accel is not None:
                accel.backward(loss)
                if accel.sync_gradients and self.clip is not None:
                    accel.clip_grad_norm_(self.params(), self.clip)
                self.optimizer.step()  # accelerate's prepared optimizer skips the step until gradients sync
                self.optimizer.zero_grad()
            else:
                (loss / self.accumulation if self.accumulation > 1 else loss).backward()
                if boundary:
                    if self.clip is not None:
                        torch.nn.utils.clip_grad_norm_(self.params(), self.clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), stats
