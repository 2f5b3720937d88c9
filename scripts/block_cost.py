"""How a block head's drafting forward costs with its block size k, beside an EAGLE-3 level (docs/block.md).

Times `BlockHead.draft` (2 pending committed entries through both layers + the k-1 slots, after a 256-entry cache;
chained, so it includes position 0's logits) and the slots' logits for several k, and one EAGLE-3 tree level (4 frontier nodes) on the shipped head, in the dtype given; prints the CPU kind.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from featspec.drafters.registry import shipped_head
from featspec.heads.block import BlockHead
from featspec.heads.checkpoint import load_head
from featspec.models import load_model


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def main(dtype_name: str = "bfloat16") -> None:
    dtype = getattr(torch, dtype_name)
    lm = load_model("smollm2-135m", dtype_name)
    e3 = load_head(shipped_head("smollm2-135m", "eagle3"), dtype=dtype).bind(lm.model)
    h = e3.cfg.hidden_size
    ctx = 256
    feats = torch.randn(ctx + 2, h, dtype=dtype)
    toks = torch.randint(0, 49152, (ctx + 2,))

    def filled(head):
        cache = head.new_cache()
        if isinstance(head, BlockHead):  # both layers' caches, through the drafting forward
            head.draft(feats[:ctx], toks[:ctx], 0, cache, head.block_size)
        else:
            head(feats[None, :ctx], toks[None, :ctx], torch.arange(ctx)[None], cache)
        return cache

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {dtype_name}")
    cache = filled(e3)
    mask = torch.ones(4, ctx + 4, dtype=torch.bool)

    def level():
        e3(feats[None, :4], toks[None, :4], torch.full((1, 4), ctx), cache, mask[None, None])
        cache.truncate(ctx)

    lv = median_ms(level)
    print(f"EAGLE-3 one tree level (4 nodes): {lv:.2f} ms (+ logits over 16,384 draft tokens: "
          f"{median_ms(lambda: e3.logits(feats[:4])):.2f} ms)")
    for k in (2, 4, 6, 8, 12, 16):
        head = BlockHead(e3.cfg, e3.layer_ids, block_size=k).to(dtype)
        head.load_state_dict({**head.state_dict(), **e3.state_dict()})
        head.bind(lm.model)
        head.init_slots(lm.model.get_input_embeddings().weight[:1000])
        cache = filled(head)
        t = median_ms(lambda: head.draft(feats[ctx:ctx + 2], toks[ctx:ctx + 2], ctx, cache, k))
        lg = median_ms(lambda: head.logits(feats[:k - 1]))
        print(f"block k={k:2d} (chained): forward incl. position 0's logits {t:.2f} ms, "
              f"logits of the {k - 1} slots {lg:.2f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:])
