"""Where does a mini target lose object positions? Ridge probes along its path from pixels to answer.

For each clip with a translating object, the first such object's x position in frame 1 (and frame 8) is
regressed linearly from: the tower's output at the patch holding the object's centre, the projected token
there (the language model's input), the language model's states at that token, and its states at the
answer position that writes the first x digit of a grounding answer ("In Frame 1 the cross is at x 2, y 7";
direction answers no longer quote cells). The score is the correlation of
prediction and truth on held-out clips. Used for docs/crossmodal.md; run it as
`python -m featspec.xmodal.train.position_probe --models DIR [--clips 400]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from featspec.xmodal.world.qa import _in_frame, _ref
from featspec.xmodal.world.scenes import WorldConfig, object_centres, render_timeline, video_frame_indices
from featspec.xmodal.train.prepare import coordinate_slots, tower_tokens
from featspec.xmodal.models.vlm import VLM, language_of, load_mini, to_pixels
from featspec.xmodal.world.clips import build_split


@torch.no_grad()
def collect(vlm: VLM, world: WorldConfig, n_clips: int, layers: tuple[int, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features per probe point (name -> (clips, dim)) and the true x of the object in frames 1 and 8 (fractions)."""
    data = build_split(world, "train", n_clips, progress=False)
    times = render_timeline(world)
    times = times[video_frame_indices(len(times))]
    lang = language_of(vlm)
    vcfg = vlm.model.config.vision_config
    grid, per = vcfg.image_size // vcfg.patch_size, (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    dtype = next(vlm.model.parameters()).dtype
    feats: dict[str, list[np.ndarray]] = {}
    truth = []
    for i, sc in enumerate(data.scenes):
        movers = [k for k, o in enumerate(sc.objects) if o.motion != "spin"]
        if not movers:
            continue
        k = movers[0]
        ref = _ref(sc, sc.objects[k])
        prompt = vlm.prompt_ids(f"Where is {ref} in frame 1?")
        answer = vlm.text_ids(_in_frame(sc.objects[k], 1, ref) + ".")
        ids = torch.tensor([prompt + answer])
        pixels = to_pixels(data.frames[i], vcfg.image_size)[None].to(dtype)
        tower = tower_tokens(vlm, pixels)[0]  # (8, tokens per frame, vision hidden)
        states = lang(inputs_embeds=vlm.with_video(ids, vlm.video_features(pixels)), output_hidden_states=True).hidden_states
        video = (ids[0] == vlm.model.config.video_token_id).nonzero()[:, 0]
        centres = object_centres(world, sc, times)[:, k]  # (8, 2) pixels
        row = {}
        for frame in (0, 7):
            cx, cy = (np.minimum(grid - 1, centres[frame] // vcfg.patch_size)).astype(int)
            patch = 1 + cy * grid + cx  # after the frame's CLS token
            row[f"tower f{frame + 1}"] = tower[frame, patch]
            for layer in layers:
                row[f"lm{layer} f{frame + 1}"] = states[layer][0, video[frame * per + patch]]
        at = len(prompt) + coordinate_slots(vlm, answer)[0]  # the position whose next token is the first x digit
        for layer in layers[1:]:
            row[f"answer lm{layer}"] = states[layer][0, at]
        for name, v in row.items():
            feats.setdefault(name, []).append(v.float().numpy())
        truth.append(centres[[0, 7], 0] / world.size)
    return {k: np.stack(v) for k, v in feats.items()}, np.array(truth)


def ridge_corr(x: np.ndarray, y: np.ndarray, train_frac: float = 0.7, lams=(0.01, 0.1, 1.0)) -> float:
    """Best held-out correlation of a standardised ridge regression over a few strengths."""
    train = np.arange(len(y)) < int(train_frac * len(y))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    best = -1.0
    for lam in lams:
        a = x[train]
        w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ (y[train] - y[train].mean()))
        pred = x[~train] @ w + y[train].mean()
        best = max(best, float(np.corrcoef(pred, y[~train])[0, 1]))
    return best


def position_probe(vlm: VLM, world: WorldConfig, n_clips: int = 400) -> dict[str, float]:
    """Probe point -> held-out correlation with the object's true x (frame 1, or frame 8 for `f8` points)."""
    n_layers = vlm.model.config.text_config.num_hidden_layers
    layers = tuple(sorted({0, *range(max(1, n_layers // 6), n_layers + 1, max(1, n_layers // 6))}))
    feats, truth = collect(vlm, world, n_clips, layers)
    return {name: ridge_corr(x, truth[:, 1] if name.endswith("f8") else truth[:, 0]) for name, x in feats.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="a mini run directory (or featspec/assets/xmodal) holding target/")
    p.add_argument("--clips", type=int, default=400, help="train clips to read (default 400)")
    args = p.parse_args(argv)
    vlm = load_mini(Path(args.models) / "target", dtype=torch.bfloat16)
    for name, r in position_probe(vlm, WorldConfig(), args.clips).items():
        print(f"{name:14s} {r:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
