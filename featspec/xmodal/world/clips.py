"""Clips as model inputs: 8 RGB frames for the video target, 5 event images for the event drafter."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from featspec.xmodal.world.events import EventConfig, event_images, luminance, simulate
from featspec.xmodal.world.scenes import Scene, WorldConfig, make_scene, render, render_timeline, video_frame_indices

WORLD_EVENTS = EventConfig(c_pos=0.2, c_neg=0.2, refractory_us=500, noise_hz=0.1)


@dataclass
class Clip:
    scene: Scene
    frames: np.ndarray  # (8, H, W, 3) uint8
    event_images: np.ndarray  # (5, H, W, 3) uint8
    events: dict[str, np.ndarray] | None = None


def make_clip(cfg: WorldConfig, split: str, index: int, ecfg: EventConfig = WORLD_EVENTS, keep_events: bool = False) -> Clip:
    scene = make_scene(cfg, split, index)
    times = render_timeline(cfg)
    rgb = render(cfg, scene, times)
    seeded = EventConfig(**{**asdict(ecfg), "seed": scene.shake_seed})  # noise differs per clip, reproducibly
    ev = simulate(luminance(rgb), times, seeded)
    frames = (rgb[video_frame_indices(len(times))] * 255).round().astype(np.uint8)
    return Clip(scene, frames, event_images(ev, cfg.size, cfg.size), ev if keep_events else None)


def _work(args) -> tuple[np.ndarray, np.ndarray]:
    cfg, split, index, ecfg = args
    c = make_clip(cfg, split, index, ecfg)
    return c.frames, c.event_images


@dataclass
class SplitData:
    scenes: list[Scene]
    frames: np.ndarray  # (N, 8, H, W, 3)
    event_images: np.ndarray  # (N, 5, H, W, 3)


def _key(cfg: WorldConfig, ecfg: EventConfig, split: str, n: int) -> str:
    blob = json.dumps([cfg.to_json(), asdict(ecfg), split, n], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_split(cfg: WorldConfig, split: str, n: int, ecfg: EventConfig = WORLD_EVENTS, cache: Path | None = None,
                workers: int = 2, progress: bool = True) -> SplitData:
    """Render and simulate `n` clips of a split (cached as .npy when `cache` is given; the scenes are recomputed)."""
    scenes = [make_scene(cfg, split, i) for i in range(n)]
    if cache is not None:
        f = Path(cache) / f"{split}-{n}-{_key(cfg, ecfg, split, n)}"
        if (f / "frames.npy").exists() and (f / "events.npy").exists():
            return SplitData(scenes, np.load(f / "frames.npy"), np.load(f / "events.npy"))
    from tqdm import tqdm

    jobs = [(cfg, split, i, ecfg) for i in range(n)]
    bar = dict(total=n, desc=f"clips {split}", disable=not progress, unit="clip")
    if workers > 1 and n >= 32:
        with get_context("spawn").Pool(workers) as pool:
            out = list(tqdm(pool.imap(_work, jobs, chunksize=8), **bar))
    else:
        out = [_work(j) for j in tqdm(jobs, **bar)]
    data = SplitData(scenes, np.stack([o[0] for o in out]), np.stack([o[1] for o in out]))
    if cache is not None:
        from featspec.io import atomic_dir_write

        def write(d: Path) -> None:
            np.save(d / "frames.npy", data.frames)
            np.save(d / "events.npy", data.event_images)

        atomic_dir_write(f, write)
    return data
