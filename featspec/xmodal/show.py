"""`featspec xmodal show`: one clip's 8 frames, 5 event images, question and both answers in one PNG."""

from __future__ import annotations

from pathlib import Path

import torch

from featspec.xmodal.world.qa import question_for
from featspec.xmodal.world.clips import make_clip
from featspec.io import save_figure


def show(models: Path, split: str, index: int, out: Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featspec.xmodal.evaluate import load_pair

    target, drafter, world = load_pair(models, dtype)
    clip = make_clip(world, split, index)
    qa = question_for(clip.scene, index)
    answers = {"target (8 RGB frames)": target.tokenizer.decode(target.generate(clip.frames, qa.question)),
               "drafter (5 event images)": drafter.tokenizer.decode(drafter.generate(clip.event_images, qa.question))}
    fig, axes = plt.subplots(3, 8, figsize=(16, 6.5), gridspec_kw={"height_ratios": [1, 1, 0.9]})
    for k in range(8):
        axes[0, k].imshow(clip.frames[k])
        axes[0, k].set_title(f"frame {k}", fontsize=8)
        if k < 5:
            axes[1, k].imshow(clip.event_images[k])
            axes[1, k].set_title(f"events {k}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    text = [f"Q: {qa.question}", f"reference: {qa.answer}"] + [f"{who}: {a}" for who, a in answers.items()]
    axes[2, 0].text(0, 0.9, "\n".join(text), fontsize=10, va="top", family="monospace", wrap=True)
    fig.suptitle(f"{split} clip {index}: " + ", ".join(f"{o.size} {o.colour} {o.shape} {o.motion}/{o.speed}"
                                                       for o in clip.scene.objects), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, dpi=80)
    plt.close(fig)
    return {"question": qa.question, "reference": qa.answer, **answers}
