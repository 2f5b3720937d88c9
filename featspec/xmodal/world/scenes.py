"""Procedural clips for the cross-modal world: textured background, lighting drift, 1-3 moving objects.

Everything is a pure function of (world config, split, index), so any split can be regenerated on any
machine; nothing but the trained models needs to be stored.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.05),
}
# No "diamond": objects start at a random angle, and a square turned 45 degrees is a diamond, so the two
# could not be told apart from pixels. A cross stays a cross at any angle.
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPLITS = ("train", "val", "test", "novel")


@dataclass(frozen=True)
class WorldConfig:
    """Generator parameters: change them to make a new distribution (seed, sets, speeds, counts)."""

    seed: int = 0
    size: int = 64
    duration_s: float = 1.0
    render_hz: int = 120
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: dict = field(default_factory=lambda: {"small": 6.0, "large": 10.0})  # radius in pixels
    speeds: dict = field(default_factory=lambda: {"slow": 14.0, "fast": 34.0})  # pixels per second
    max_objects: int = 3
    spin_prob: float = 0.2  # an object that spins in place instead of moving
    camera_shake: float = 0.0  # amplitude in pixels of a whole-image jitter; 0 = static camera
    novel_pairs: int = 4  # (shape, colour) pairs held out of train/val/test and required in `novel`

    def __post_init__(self) -> None:
        bad = [c for c in self.colours if c not in COLOURS]
        if bad:
            raise ValueError(f"unknown colour {bad[0]}: use some of {', '.join(COLOURS)}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown shape {bad[0]}: use some of {', '.join(SHAPES)}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError("max_objects must be 1, 2 or 3")
        if self.novel_pairs >= len(self.shapes) * len(self.colours):
            raise ValueError("novel_pairs must leave some (shape, colour) pairs for training")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "WorldConfig":
        d = dict(d)
        for k in ("shapes", "colours"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def held_out_pairs(self) -> set[tuple[str, str]]:
        """The (shape, colour) combinations only the novel split contains; fixed by the seed."""
        pairs = list(itertools.product(self.shapes, self.colours))
        rng = np.random.default_rng([self.seed, 7919])
        chosen: set[tuple[str, str]] = set()
        for i in rng.permutation(len(pairs)):
            s, c = pairs[i]
            # never hold out every pair of one shape or colour: each value must stay learnable
            if sum(p[0] == s for p in chosen) + 1 >= len(self.colours) or sum(p[1] == c for p in chosen) + 1 >= len(self.shapes):
                continue
            chosen.add((s, c))
            if len(chosen) == self.novel_pairs:
                break
        return chosen


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    motion: str  # a direction name or "spin"
    speed: str  # "slow" / "fast" (for spin: how fast it turns)
    x0: float
    y0: float
    angle0: float
    spin: float  # radians per second
    path: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # start x, y and end x, y as fractions of
    # the frame (first and last video frame): what answers that reason about motion quote


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    background: tuple[float, ...]  # texture parameters
    light: tuple[float, float, float]  # amplitude, frequency (Hz), phase of the lighting drift
    shake_seed: int

    def signature(self) -> tuple:
        return tuple((o.shape, o.colour, o.size, o.motion, o.speed, round(o.x0, 3), round(o.y0, 3)) for o in self.objects)


def _rng(cfg: WorldConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    digest = hashlib.sha256(f"{cfg.seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Sample scene `index` of `split`: deterministic, and distinct seeds per split."""
    rng = _rng(cfg, split, index)
    held = cfg.held_out_pairs()
    allowed = [p for p in itertools.product(cfg.shapes, cfg.colours) if (p in held) == (split == "novel")]
    normal = [p for p in itertools.product(cfg.shapes, cfg.colours) if p not in held]
    n = int(rng.integers(1, cfg.max_objects + 1))
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        # the novel split needs one held-out pair; the others come from the ordinary pool
        pool = allowed if (split == "novel" and not pairs) else normal
        p = pool[int(rng.integers(len(pool)))]
        if p not in pairs:
            pairs.append(p)
    objects = []
    used_motions: list[str] = []
    for shape, colour in pairs:
        size = list(cfg.sizes)[int(rng.integers(len(cfg.sizes)))]
        r = cfg.sizes[size]
        spin = rng.random() < cfg.spin_prob
        motion = "spin" if spin else list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        if not spin and motion in used_motions and rng.random() < 0.7:
            # prefer distinct directions so "the object moving left" usually names one object
            motion = [m for m in DIRECTIONS if m not in used_motions][0] if len(used_motions) < 4 else motion
        used_motions.append(motion)
        speed = list(cfg.speeds)[int(rng.integers(len(cfg.speeds)))]
        travel = 0.0 if spin else cfg.speeds[speed] * cfg.duration_s
        dx, dy = (0.0, 0.0) if spin else DIRECTIONS[motion]
        lo, hi = r + 1, cfg.size - r - 1
        # start so the whole path stays inside the frame
        x0 = rng.uniform(max(lo, lo - dx * travel), min(hi, hi - dx * travel))
        y0 = rng.uniform(max(lo, lo - dy * travel), min(hi, hi - dy * travel))
        rate = (4.0 if speed == "fast" else 1.5) if spin else rng.uniform(-1.0, 1.0)
        if shape == "circle" and spin:
            rate = 0.0  # a spinning disc is invisible to any camera; circles that "spin" stand still
        path = (x0 / cfg.size, y0 / cfg.size, (x0 + dx * travel) / cfg.size, (y0 + dy * travel) / cfg.size)
        objects.append(SceneObject(shape, colour, size, motion, speed, float(x0), float(y0),
                                   float(rng.uniform(0, np.pi)), float(rate), tuple(float(v) for v in path)))
    background = tuple(float(v) for v in rng.uniform(0, 1, size=9))
    light = (float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.3, 1.5)), float(rng.uniform(0, 2 * np.pi)))
    return Scene(split, index, tuple(objects), background, light, int(rng.integers(1 << 31)))


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance, so sub-pixel motion changes intensity smoothly."""
    if shape == "circle":
        d = np.sqrt(dx**2 + dy**2) - r
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.85
    elif shape == "cross":  # union of two bars, arm half-width 0.35 r
        ax, ay = np.abs(dx), np.abs(dy)
        d = np.minimum(np.maximum(ax - r, ay - 0.35 * r), np.maximum(ax - 0.35 * r, ay - r))
    else:  # triangle pointing up in its own frame: max of three half-plane distances
        k = np.sqrt(3.0)
        d = np.maximum(np.maximum(dy - r * 0.5, (-k * dx - dy) / 2 - r * 0.5), (k * dx - dy) / 2 - r * 0.5)
    return np.clip(0.5 - d, 0.0, 1.0)


def object_centres(cfg: WorldConfig, scene: Scene, times: np.ndarray) -> np.ndarray:
    """(T, n_objects, 2) float32 centre x, y of every object at each time (the renderer's ground truth)."""
    t = np.asarray(times, dtype=np.float32)
    out = np.zeros((len(t), len(scene.objects), 2), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        dx, dy = (0.0, 0.0) if o.motion == "spin" else DIRECTIONS[o.motion]
        v = 0.0 if o.motion == "spin" else cfg.speeds[o.speed]
        out[:, k, 0] = o.x0 + dx * v * t
        out[:, k, 1] = o.y0 + dy * v * t
    return out


def _pixel_grid(cfg: WorldConfig, scene: Scene, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scene coordinates of every pixel at each time, camera shake included: (T, H, W) x and y."""
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    shake = np.zeros((len(times), 2), dtype=np.float32)
    if cfg.camera_shake > 0:
        srng = np.random.default_rng(scene.shake_seed)
        f = srng.uniform(2, 6, size=2)
        shake = cfg.camera_shake * np.sin(2 * np.pi * f[None] * np.asarray(times)[:, None] + srng.uniform(0, 6, size=2))
    return ((xx[None] + shake[:, 0, None, None]).astype(np.float32),
            (yy[None] + shake[:, 1, None, None]).astype(np.float32))


def object_masks(cfg: WorldConfig, scene: Scene, times: np.ndarray) -> np.ndarray:
    """(T, n_objects, H, W) anti-aliased coverage of every object (before occlusion by later objects)."""
    t = np.asarray(times, dtype=np.float32)[:, None, None]
    ox, oy = _pixel_grid(cfg, scene, times)
    centres = object_centres(cfg, scene, times)
    out = np.zeros((len(times), len(scene.objects), cfg.size, cfg.size), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        cx, cy = centres[:, k, 0, None, None], centres[:, k, 1, None, None]
        a = o.angle0 + o.spin * t
        rx, ry = ox - cx, oy - cy
        ux = np.cos(a) * rx + np.sin(a) * ry
        uy = -np.sin(a) * rx + np.cos(a) * ry
        out[:, k] = _mask(o.shape, ux, uy, cfg.sizes[o.size])
    return out


def render(cfg: WorldConfig, scene: Scene, times: np.ndarray) -> np.ndarray:
    """RGB float32 images (T, H, W, 3) in [0, 1] at the given times (seconds)."""
    t = np.asarray(times, dtype=np.float32)[:, None, None]
    ox, oy = _pixel_grid(cfg, scene, times)
    b = scene.background
    # smooth grey texture: a few oriented sinusoids, low contrast so objects stand out
    tex = 0.45 + 0.08 * np.sin(ox * (0.15 + 0.3 * b[0]) + oy * (0.1 * b[1]) + 6 * b[2]) \
        + 0.06 * np.sin(oy * (0.2 + 0.3 * b[3]) - ox * 0.1 * b[4] + 6 * b[5]) + 0.04 * np.sin((ox + oy) * (0.5 + b[6]))
    tint = 0.9 + 0.2 * np.array(b[6:9], dtype=np.float32)
    img = np.clip(tex, 0, 1)[..., None] * tint
    masks = object_masks(cfg, scene, times)
    for k, o in enumerate(scene.objects):
        m = masks[:, k, ..., None]
        img = img * (1 - m) + m * np.array(COLOURS[o.colour], dtype=np.float32)
    amp, freq, phase = scene.light
    gain = 1.0 + amp * np.sin(2 * np.pi * freq * t[..., None] + phase)
    return np.clip(img * gain, 0, 1).astype(np.float32)


def render_timeline(cfg: WorldConfig) -> np.ndarray:
    """Render times of the high-rate sequence events are simulated from."""
    return np.linspace(0.0, cfg.duration_s, int(round(cfg.duration_s * cfg.render_hz)) + 1)


def video_frame_indices(n_renders: int, n_frames: int = 8) -> np.ndarray:
    """Uniformly sampled frames, as Video-LLaVA samples 8 of a clip."""
    return np.linspace(0, n_renders - 1, n_frames).round().astype(int)
