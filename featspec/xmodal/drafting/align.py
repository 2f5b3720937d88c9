"""Aligned feature pairs: both models teacher-forced on the SAME target answer tokens.

Per clip, the target answers once (greedy); then the target and the drafter each read that answer with
their own visual input, and per answer position we keep the drafter's LM-head input, the target's LM-head
input, the token at that position and the next token (the target's greedy choice). Pairing by position in
two independent generations, as a public attempt did, pairs unrelated states once the texts diverge.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from featspec.xmodal.world.qa import question_for
from featspec.xmodal.models.vlm import VLM
from featspec.xmodal.world.clips import SplitData
from featspec.io import torch_save


@torch.no_grad()
def last_hidden(vlm: VLM, images: np.ndarray, question: str, answer: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """LM-head inputs (normed last hidden) over prompt + answer, the prompt length in cache positions, and
    the visual positions' states (target only; empty for the drafter)."""
    inputs = vlm.inputs(images, question)
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer], dtype=torch.long, device=inputs["input_ids"].device)], dim=1)
    emb = vlm.embeds({**inputs, "input_ids": ids})
    lang = vlm.model.model.language_model if vlm.kind == "video" else vlm.model.model
    h = lang(inputs_embeds=emb).last_hidden_state[0]
    prompt_len = emb.shape[1] - len(answer)
    if vlm.kind == "video":
        visual = h[: ids.shape[1]][(ids[0] == vlm.model.config.video_token_id)]
    else:
        visual = h[:0]
    return h, visual, prompt_len


def estimate_bytes(n_clips: int, mean_answer: int, h_draft: int, h_target: int, n_visual: int) -> int:
    per_pos = 2 * (h_draft + h_target) + 16
    return n_clips * ((mean_answer + 1) * per_pos + n_visual * h_target * 2)


def align(target: VLM, drafter: VLM, data: SplitData, limit: int, max_new_tokens: int = 64,
          progress: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Aligned pairs for the first `limit` clips (question kinds cycle with the clip index)."""
    from tqdm import tqdm

    eos = target.eos_ids[0]
    rows: dict[str, list] = {k: [] for k in ("draft", "target", "token", "next", "clip")}
    visual, answers = [], []
    t0 = time.time()
    for i in tqdm(range(limit), desc="align", disable=not progress):
        qa = question_for(data.scenes[i], i + seed)
        answer = target.generate(data.frames[i], qa.question, max_new_tokens)
        seq = answer + [eos]  # the last position predicts EOS
        ht, vis, pt = last_hidden(target, data.frames[i], qa.question, seq)
        hd, _, pd = last_hidden(drafter, data.event_images[i], qa.question, seq)
        n = len(seq)  # positions pt-1 .. pt+n-2 predict seq[0..n-1]
        rows["target"].append(ht[pt - 1: pt - 1 + n].to(torch.bfloat16))
        rows["draft"].append(hd[pd - 1: pd - 1 + n].to(torch.bfloat16))
        prev = target.prompt_ids(qa.question)[-1]
        rows["token"].append(torch.tensor([prev] + seq[:-1]))
        rows["next"].append(torch.tensor(seq))
        rows["clip"].append(torch.full((n,), i))
        visual.append(vis.to(torch.bfloat16))
        answers.append(answer)
    out = {k: torch.cat(v) for k, v in rows.items()}
    out["visual"] = torch.stack(visual)
    out["seconds"] = torch.tensor(time.time() - t0)
    return out


def save_pairs(pairs: dict[str, torch.Tensor], path: Path) -> None:
    torch_save(pairs, path)


def sequences(pairs: dict[str, torch.Tensor], device=None) -> list[dict[str, torch.Tensor]]:
    """Split flat pairs back into per-clip sequences (what causal adapters read)."""
    clips = pairs["clip"]
    out = []
    for c in torch.unique_consecutive(clips).tolist():
        m = clips == c
        out.append({"draft": pairs["draft"][m], "target": pairs["target"][m], "token": pairs["token"][m],
                    "next": pairs["next"][m], "visual": pairs["visual"][len(out)]})
    return out
