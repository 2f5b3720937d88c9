"""An ESIM-style event simulator and the event representations drafters read.

A pixel fires when its log intensity has moved by the contrast threshold since its last reference;
timestamps are interpolated linearly between the renders. Events carry polarity, never colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EventConfig:
    c_pos: float = 0.2  # contrast threshold for ON (p=1) events, in log intensity
    c_neg: float = 0.2  # ... for OFF (p=0) events
    refractory_us: int = 0  # a pixel that fired stays silent this long
    noise_hz: float = 0.0  # background-activity noise rate per pixel
    eps: float = 1e-3  # log(I + eps) keeps black pixels finite
    seed: int = 0


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey level an event sensor integrates (ITU-R 601 weights); colour is lost here on purpose."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def simulate(intensity: np.ndarray, times_s: np.ndarray, cfg: EventConfig = EventConfig()) -> dict[str, np.ndarray]:
    """Events from a (T, H, W) intensity sequence sampled at `times_s`: dict x, y, t (us, int64), p (0/1)."""
    if intensity.ndim != 3 or len(intensity) != len(times_s) or len(times_s) < 2:
        raise ValueError("simulate needs intensity (T, H, W) with T >= 2 matching times_s")
    logi = np.log(intensity.astype(np.float64) + cfg.eps)
    h, w = logi.shape[1:]
    ref = logi[0].copy()
    last_t = np.full((h, w), -np.inf)
    xs, ys, ts, ps = [], [], [], []
    for k in range(1, len(times_s)):
        l0, l1 = logi[k - 1], logi[k]
        t0, t1 = float(times_s[k - 1]) * 1e6, float(times_s[k]) * 1e6
        diff = l1 - ref
        up = diff >= cfg.c_pos
        down = diff <= -cfg.c_neg
        n = np.where(up, np.floor(diff / cfg.c_pos), np.where(down, np.floor(-diff / cfg.c_neg), 0)).astype(np.int64)
        if not n.any():
            continue
        yy, xx = np.nonzero(n)
        sign = np.where(up[yy, xx], 1.0, -1.0)
        step = np.where(up[yy, xx], cfg.c_pos, cfg.c_neg)
        span = l1[yy, xx] - l0[yy, xx]
        for j in range(1, int(n.max()) + 1):
            live = n[yy, xx] >= j
            if not live.any():
                break
            y, x = yy[live], xx[live]
            level = ref[y, x] + sign[live] * j * step[live]
            frac = np.clip((level - l0[y, x]) / np.where(span[live] == 0, 1.0, span[live]), 0.0, 1.0)
            t = t0 + frac * (t1 - t0)
            ok = t - last_t[y, x] >= cfg.refractory_us
            # the reference follows every crossing; only the report is suppressed during the refractory period
            xs.append(x[ok]); ys.append(y[ok]); ts.append(t[ok]); ps.append((sign[live][ok] > 0).astype(np.uint8))
            last_t[y[ok], x[ok]] = t[ok]
        ref[yy, xx] += sign * n[yy, xx] * step
    if cfg.noise_hz > 0:
        rng = np.random.default_rng(cfg.seed)
        dur = (times_s[-1] - times_s[0])
        m = rng.poisson(cfg.noise_hz * dur * h * w)
        xs.append(rng.integers(0, w, m)); ys.append(rng.integers(0, h, m))
        ts.append(times_s[0] * 1e6 + rng.uniform(0, dur * 1e6, m)); ps.append(rng.integers(0, 2, m).astype(np.uint8))
    if not xs:
        return {"x": np.zeros(0, np.uint16), "y": np.zeros(0, np.uint16), "t": np.zeros(0, np.int64), "p": np.zeros(0, np.uint8)}
    t = np.concatenate(ts)
    order = np.argsort(t, kind="stable")
    return {"x": np.concatenate(xs)[order].astype(np.uint16), "y": np.concatenate(ys)[order].astype(np.uint16),
            "t": np.round(t[order]).astype(np.int64), "p": np.concatenate(ps)[order].astype(np.uint8)}


def save_npy(events: dict[str, np.ndarray], path: Path) -> None:
    """EventGPT's file format: a .npy holding a pickled dict with x, y, t (us), p."""
    np.save(path, {k: events[k] for k in ("x", "y", "t", "p")}, allow_pickle=True)


def load_npy(path: Path) -> dict[str, np.ndarray]:
    """Read an EventGPT-style .npy; a clear error if the dict lacks a key."""
    data = np.load(path, allow_pickle=True)
    d = data.item() if data.dtype == object else None
    if not isinstance(d, dict) or any(k not in d for k in ("x", "y", "t", "p")):
        raise ValueError(f"{path} is not an event file: expected a .npy dict with keys x, y, t, p")
    return {k: np.asarray(d[k]) for k in ("x", "y", "t", "p")}


def event_images(events: dict[str, np.ndarray], height: int, width: int, n: int = 5) -> np.ndarray:
    """EventGPT's input: events split into n equal-count chunks, each drawn on white (p=1 red, p=0 blue)."""
    out = np.full((n, height, width, 3), 255, dtype=np.uint8)
    m = len(events["t"])
    bounds = [i * (m // n) for i in range(n)] + [m]  # the last chunk takes the remainder, as EventGPT does
    for i in range(n):
        sl = slice(bounds[i], bounds[i + 1])
        x, y, p = events["x"][sl].astype(int), events["y"][sl].astype(int), events["p"][sl]
        out[i, y, x] = np.where(p[:, None] > 0, np.array([255, 0, 0], np.uint8), np.array([0, 0, 255], np.uint8))
    return out


def voxel_grid(events: dict[str, np.ndarray], height: int, width: int, bins: int = 5) -> np.ndarray:
    """(bins, H, W) float32: signed polarity spread bilinearly over time bins."""
    grid = np.zeros((bins, height, width), dtype=np.float32)
    if len(events["t"]) == 0:
        return grid
    t = events["t"].astype(np.float64)
    tn = (t - t[0]) / max(t[-1] - t[0], 1) * (bins - 1)
    lo = np.floor(tn).astype(int)
    w_hi = (tn - lo).astype(np.float32)
    pol = np.where(events["p"] > 0, 1.0, -1.0).astype(np.float32)
    x, y = events["x"].astype(int), events["y"].astype(int)
    np.add.at(grid, (lo, y, x), pol * (1 - w_hi))
    hi = np.minimum(lo + 1, bins - 1)
    np.add.at(grid, (hi, y, x), pol * w_hi)
    return grid


def histogram(events: dict[str, np.ndarray], height: int, width: int) -> np.ndarray:
    """(2, H, W) float32 event counts: channel 0 OFF, channel 1 ON."""
    hist = np.zeros((2, height, width), dtype=np.float32)
    np.add.at(hist, (events["p"].astype(int), events["y"].astype(int), events["x"].astype(int)), 1.0)
    return hist
