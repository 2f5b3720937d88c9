"""`featspec train`: an EAGLE-1 or EAGLE-3 draft head for a target (checkpoints, --resume, --init-from)."""

from __future__ import annotations

from featspec.cli.common import DTYPE_CHOICES, command_line, int_list
from featspec.validate import finite_float, int_range, nonneg_int, positive_int, seed


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train an EAGLE-1 or EAGLE-3 draft head (checkpoints, --resume)")
    from featspec.train.trainer import DEFAULT_DRAFT_VOCAB, TrainConfig

    d = TrainConfig()
    t.add_argument("--method", choices=("eagle1", "eagle3", "block"), default=d.method,
                   help=f"head type (default {d.method}); block: all draft positions from one head forward (docs/block.md)")
    t.add_argument("--target", default=d.target, help=f"target model spec (default {d.target})")
    t.add_argument("--data", default=d.data, help="training data: sharegpt (the held-out benchmark slice is excluded)")
    t.add_argument("--max-conversations", type=positive_int, default=d.max_conversations,
                   help=f"conversations to train on (default {d.max_conversations})")
    t.add_argument("--skip-conversations", type=nonneg_int, default=d.skip_conversations, metavar="N",
                   help="leave out the first N conversations of the seeded order, e.g. the ones an --init-from head "
                        "already trained on (default 0)")
    t.add_argument("--max-length", type=positive_int, default=d.max_length, help=f"tokens per conversation (default {d.max_length})")
    t.add_argument("--out", required=True, help="run directory: checkpoint/ while training, head/ at the end")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    t.add_argument("--epochs", type=positive_int, default=d.epochs)
    t.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"sequences per micro-batch (default {d.batch_size}; 1 avoids padding on a CPU)")
    t.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help=f"micro-batches per step (default {d.grad_accum})")
    t.add_argument("--lr", type=finite_float(0.0, lo_open=True), default=d.lr, help=f"peak learning rate (default {d.lr}); warm-up then cosine")
    t.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps)
    t.add_argument("--ttt-steps", type=positive_int, default=d.ttt_steps,
                   help=f"EAGLE-3 training-time-test steps (default {d.ttt_steps}; the paper uses 7)")
    t.add_argument("--draft-vocab", type=positive_int, default=d.draft_vocab, help=f"EAGLE-3 draft vocabulary (default {DEFAULT_DRAFT_VOCAB} for a new head, the head's own "
                        "size with --init-from; a larger value then widens it: trained rows kept, new tokens added by frequency)")
    t.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype, help="bfloat16 autocast (default) or float32")
    t.add_argument("--save-every", type=positive_int, default=d.save_every, help="optimizer steps between checkpoints")
    t.add_argument("--eval-every", type=nonneg_int, default=d.eval_every, help="optimizer steps between held-out evaluations (0 = end only)")
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="stop after this many optimizer steps (0 = full schedule)")
    t.add_argument("--seed", type=seed, default=d.seed)
    t.add_argument("--regenerate", action="store_true", help="answer the first user turn of each conversation with the target itself (greedy, "
                        "batched, cached under ~/.cache/featspec/regenerated) and train on those answers")

    t.add_argument("--block-size", type=int_range(2, 16), default=d.block_size,
                   help=f"block: positions drafted per head forward (default {d.block_size})")
    t.add_argument("--anchors", type=positive_int, default=d.anchors,
                   help=f"block: anchor positions per sequence whose mask slots each micro-batch scores (default {d.anchors})")
    t.add_argument("--train-base", action="store_true",
                   help="block: also train the EAGLE-3 part it starts from (by default only the slots learn, so "
                        "position 0 drafts exactly as the EAGLE-3 head does)")
    t.add_argument("--layer-ids", default="", metavar="A,B,C",
                   help="EAGLE-3: the three HF hidden_states indices the head fuses (hidden_states[k] is the input of "
                        "layer k; default 2, L//2, L-3)")
    t.add_argument("--cache-features", default="", metavar="DIR",
                   help="compute the target's features once into DIR (disk estimate printed first) and read them in "
                        "every epoch, instead of running the target in each step")
    t.add_argument("--init-from", default="",
                   help="start from this head directory or run directory (its checkpoint), e.g. to fine-tune on "
                        "regenerated answers")

    t.set_defaults(run=run)


def run(args) -> int:
    from featspec.train.trainer import TrainConfig, train
    from featspec.validate import check_destination

    check_destination(args.out, "--out", directory=True)

    cfg = TrainConfig(
        method=args.method, target=args.target, data=args.data, max_conversations=args.max_conversations,
        max_length=args.max_length, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps, ttt_steps=args.ttt_steps,
        draft_vocab=args.draft_vocab, dtype=args.dtype, save_every=args.save_every, eval_every=args.eval_every,
        max_steps=args.max_steps, seed=args.seed, regenerate=args.regenerate, init_from=args.init_from,
        cache_features=args.cache_features, skip_conversations=args.skip_conversations,
        layer_ids=int_list(args.layer_ids, "--layer-ids"), block_size=args.block_size, anchors=args.anchors,
        train_base=args.train_base,
    )
    train(cfg, resume=args.resume, command=command_line())
    return 0
