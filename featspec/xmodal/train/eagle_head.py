"""Option D: an EAGLE-3 head for the video target itself, trained on its own features over the clips.

The head reads the target's fused low/mid/high hidden states at every position, visual positions
included (their token is the video placeholder id, exactly what the engine feeds at run time), and is
trained with the same EAGLE-3 loss as text heads (training-time test, soft CE against the target's own
distribution). The texts are the world's reference answers: the loss targets are the target's
distributions on them, so no generation is needed and every train clip and question kind can be used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featspec.heads.checkpoint import save_head
from featspec.xmodal.world.qa import questions
from featspec.xmodal.models.vlm import VLM, to_pixels
from featspec.xmodal.world.clips import SplitData
from featspec.train.data import Example, collate
from featspec.train.losses import target_batch
from featspec.train.loop import Loop, warmup_cosine
from featspec.train.objective import HeadLoss, build_head


def clip_examples(target: VLM, data: SplitData, seed: int = 0) -> list[tuple[int, Example]]:
    """(clip, prompt + reference answer + EOS) for every question kind of every clip; loss on the answer."""
    out = []
    for i, scene in enumerate(data.scenes):
        for qa in questions(scene, seed=seed):
            prompt = target.prompt_ids(qa.question)
            answer = target.text_ids(qa.answer) + [target.eos_ids[0]]
            out.append((i, Example(prompt + answer, [0] * len(prompt) + [1] * len(answer), qa.kind)))
    return out


def train_target_head(target: VLM, data: SplitData, work: Path, head_dir: Path, steps: int = 400, batch_size: int = 8, lr: float = 1e-3,
                      ttt_steps: int = 3, draft_vocab: int = 1024, seed: int = 0, checkpoint_every: int = 50,
                      progress: bool = True) -> dict:
    """Train (or resume from WORK/checkpoint/) the head on the core loop; writes it to `head_dir` (engine layout)."""
    examples = clip_examples(target, data, seed)
    torch.manual_seed(seed)
    head = build_head("eagle3", target.model, [e for _, e in examples], target.eos_ids, draft_vocab).bind(target.model)
    head.float().train()
    loss_fn = HeadLoss("eagle3", head, target.model.lm_head, ttt_steps=ttt_steps)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps))
    loop = Loop(opt, sched, head.parameters, total=steps, clip=0.5, ckpt=Path(work) / "checkpoint",
                save_every=checkpoint_every, state=lambda: {"head": head.state_dict()}, desc="target eagle3 head",
                progress=progress, meta={"log": []})
    loop.resume(lambda blob: head.load_state_dict(blob["head"]))

    def micro_step(step: int):
        pick = np.random.default_rng([seed, step, 5]).choice(len(examples), size=batch_size, replace=False)
        clips = [examples[j][0] for j in pick]
        batch = collate([examples[j][1] for j in pick], target.eos_ids[0])
        pixels = to_pixels(data.frames[clips], target.image_size).to(target.model.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=target.model.dtype == torch.bfloat16):
            with torch.no_grad():  # the target is frozen: its embeddings need no graph
                emb = target.embeds({"input_ids": batch["input_ids"], "pixel_values_videos": pixels})
            tb = target_batch(target.model, head, batch, inputs_embeds=emb)
            return loss_fn(tb, seed * 7919 + step)

    def after_step(step: int, loss: float, stats: dict) -> dict:
        loop.meta["log"].append({"loss": round(loss, 4), **{k: round(v, 4) for k, v in stats.items()}})
        return {"loss": f"{loss:.3f}", "acc0": f"{stats.get('acc_0', 0):.2f}"}

    state = loop.run(micro_step, after_step)
    tail = state["log"][-20:]
    record = {"steps": steps, "seconds": round(state["wall_s"], 1), "examples": len(examples),
              **{k: round(float(np.mean([r[k] for r in tail])), 4) for k in tail[0] if k.startswith(("acc", "loss"))}}
    save_head(head, Path(head_dir), extra={"xmodal": record})
    return record
