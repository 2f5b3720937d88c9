"""featspec command line: generate, bench, train, export, xmodal."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from featspec.errors import FeatspecError

DTYPE_CHOICES = ("bfloat16", "float32")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit with code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from featspec.models.registry import ALIASES, DEFAULT_TARGET

    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"model alias ({', '.join(ALIASES)}), local HF directory or hub id (default {DEFAULT_TARGET})")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16",
                   help="bfloat16 for speed (default); float32 for bit-exact comparisons with HF generate")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens when sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one torch.Generator every draw uses")
    p.add_argument("--draft-model", default=None,
                   help="for method 'model': a model spec with the target's tokenizer, or layers:N for the target's "
                        "first N layers (default: a quarter of the target's layers)")
    p.add_argument("--draft-length", type=_positive_int, default=4, help="tokens the 'model' drafter proposes per step")
    p.add_argument("--head", default=None,
                   help="for eagle1/eagle2/eagle3: head directory or hub id (default: the head featspec ships for the target)")
    p.add_argument("--depth", type=_positive_int, default=None,
                   help="eagle2/eagle3: dynamic tree depth (default 4; with --budget auto a ceiling, default 8)")
    p.add_argument("--topk", type=_positive_int, default=4, help="eagle2/eagle3: children per expanded node (default 4)")
    p.add_argument("--total-tokens", type=_positive_int, default=None,
                   help="eagle2/eagle3: draft nodes verified per step (default 8; with --budget auto a ceiling, default 32)")
    p.add_argument("--budget", choices=("fixed", "auto"), default="fixed",
                   help="eagle2/eagle3: auto picks the draft depth and node count every step from draft confidence, "
                        "the measured verify-cost curve of this machine and measured drafting time (default fixed); "
                        "bench methods eagle2-auto / eagle3-auto do the same beside the fixed ones")
    p.add_argument("--lookup", action="store_true",
                   help="graft prompt-lookup continuations (matches of the last 2-4 tokens in the context, up to 16 "
                        "extra nodes) onto the drafter's tree; bench methods eagle3-lookup / eagle3-auto-lookup do the "
                        "same beside the plain ones")


def build_parser() -> argparse.ArgumentParser:
    from featspec.bench.datasets import DATASETS
    from featspec.bench.methods import METHODS
    from featspec.drafters import DRAFT_METHODS

    parser = _Parser(prog="featspec", description="Lossless speculative decoding for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate a reply, streaming it, with speed statistics")
    _add_model_args(g)
    g.add_argument("--prompt", help="user message (rendered with the tokenizer's chat template when it has one)")
    g.add_argument("--prompt-file", help="read the user message from this file")
    g.add_argument("--method", default=None,
                   help=f"drafter: {', '.join(DRAFT_METHODS)} (default eagle3 when featspec ships a head for the "
                        "target, else ngram)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--compare", action="store_true",
                   help="also run HF generate on the same prompt and print a one-line speed comparison")
    g.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of streaming it")

    b = sub.add_parser("bench", help="benchmark methods side by side, interleaved, against HF generate")
    _add_model_args(b)
    b.add_argument("--dataset", default="mt-bench", help=f"one of {', '.join(DATASETS)} (default mt-bench)")
    b.add_argument("--limit", type=int, default=10, help="number of prompts (default 10)")
    b.add_argument("--methods", default="hf,vanilla,ngram", help=f"comma list from {', '.join(METHODS)}")
    b.add_argument("--warmup", type=int, default=1, help="warm-up rounds over all methods before timing (default 1)")
    b.add_argument("--json", default="bench.json", help="where to write the JSON report (a .png and .md go beside it)")
    t = sub.add_parser("train", help="train an EAGLE-1 or EAGLE-3 draft head (checkpoints, --resume)")
    from featspec.train.trainer import DEFAULT_DRAFT_VOCAB, TrainConfig

    d = TrainConfig()
    t.add_argument("--method", choices=("eagle1", "eagle3"), default=d.method, help=f"head type (default {d.method})")
    t.add_argument("--target", default=d.target, help=f"target model spec (default {d.target})")
    t.add_argument("--data", default=d.data, help="training data: sharegpt (the held-out benchmark slice is excluded)")
    t.add_argument("--max-conversations", type=_positive_int, default=d.max_conversations,
                   help=f"conversations to train on (default {d.max_conversations})")
    t.add_argument("--skip-conversations", type=int, default=d.skip_conversations, metavar="N",
                   help="leave out the first N conversations of the seeded order, e.g. the ones an --init-from head "
                        "already trained on (default 0)")
    t.add_argument("--max-length", type=_positive_int, default=d.max_length, help=f"tokens per conversation (default {d.max_length})")
    t.add_argument("--out", required=True, help="run directory: checkpoint/ while training, head/ at the end")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs)
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"sequences per micro-batch (default {d.batch_size}; 1 avoids padding on a CPU)")
    t.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum, help=f"micro-batches per step (default {d.grad_accum})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr}); warm-up then cosine")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    t.add_argument("--ttt-steps", type=_positive_int, default=d.ttt_steps,
                   help=f"EAGLE-3 training-time-test steps (default {d.ttt_steps}; the paper uses 7)")
    t.add_argument("--draft-vocab", type=_positive_int, default=d.draft_vocab, help=f"EAGLE-3 draft vocabulary (default {DEFAULT_DRAFT_VOCAB} for a new head, the head's own "
                        "size with --init-from; a larger value then widens it: trained rows kept, new tokens added by frequency)")
    t.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype, help="bfloat16 autocast (default) or float32")
    t.add_argument("--save-every", type=_positive_int, default=d.save_every, help="optimizer steps between checkpoints")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help="optimizer steps between held-out evaluations (0 = end only)")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = full schedule)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--regenerate", action="store_true", help="answer the first user turn of each conversation with the target itself (greedy, "
                        "batched, cached under ~/.cache/featspec/regenerated) and train on those answers")

    t.add_argument("--cache-features", default="", metavar="DIR",
                   help="compute the target's features once into DIR (disk estimate printed first) and read them in "
                        "every epoch, instead of running the target in each step")
    t.add_argument("--init-from", default="",
                   help="start from this head directory or run directory (its checkpoint), e.g. to fine-tune on "
                        "regenerated answers")

    e = sub.add_parser("export", help="write a checked copy of a head in the vLLM / SGLang layout")
    e.add_argument("--head", required=True, help="head directory or hub id")
    e.add_argument("--format", choices=("vllm", "sglang"), required=True)
    e.add_argument("--out", required=True, help="output directory")

    from featspec.crossmodal.cli import add_parser as add_xmodal

    add_xmodal(sub)
    return parser


def cmd_train(args) -> int:
    from featspec.train.trainer import TrainConfig, train

    cfg = TrainConfig(
        method=args.method, target=args.target, data=args.data, max_conversations=args.max_conversations,
        max_length=args.max_length, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps, ttt_steps=args.ttt_steps,
        draft_vocab=args.draft_vocab, dtype=args.dtype, save_every=args.save_every, eval_every=args.eval_every,
        max_steps=args.max_steps, seed=args.seed, regenerate=args.regenerate, init_from=args.init_from,
        cache_features=args.cache_features, skip_conversations=args.skip_conversations,
    )
    if cfg.skip_conversations < 0:
        raise FeatspecError(f"--skip-conversations must be >= 0, got {cfg.skip_conversations}")
    if cfg.lr <= 0:
        raise FeatspecError(f"--lr must be > 0, got {cfg.lr}")
    train(cfg, resume=args.resume, command="featspec " + " ".join(sys.argv[1:]))
    return 0


def cmd_export(args) -> int:
    from featspec.formats import export_head

    info = export_head(args.head, args.format, Path(args.out))
    print(f"exported {info['kind']} head ({info['tensors']} tensors) for {info['format']} to {info['out']}; reload check passed")
    return 0


def _draft_options(args):
    from featspec.drafters import DraftOptions

    return DraftOptions(draft_model=args.draft_model, draft_length=args.draft_length, head=args.head, depth=args.depth,
                        topk=args.topk, total_tokens=args.total_tokens, budget=args.budget, lookup=args.lookup)


def _sampling(args):
    from featspec.sampling import SamplingConfig

    if args.max_new_tokens < 1:
        raise FeatspecError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def cmd_generate(args) -> int:
    from featspec.bench.methods import HFMethod
    from featspec.drafters import DRAFT_METHODS, SHIPPED_HEADS, build_drafter, check_lookup
    from featspec.engine import SpeculativeGenerator, eos_token_ids
    from featspec.models import TargetModel, load_model
    from featspec.prompts import encode_messages, has_chat_template

    sampling = _sampling(args)
    if args.method is None:
        args.method = "eagle3" if (SHIPPED_HEADS / args.target / "eagle3" / "config.json").exists() else "ngram"
    if args.method not in DRAFT_METHODS:
        raise FeatspecError(f"unknown method '{args.method}': use one of {', '.join(DRAFT_METHODS)}")
    check_lookup(args.method, args.lookup)
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text()
        except OSError as exc:
            raise FeatspecError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror or exc}") from None
    else:
        prompt = args.prompt
    if prompt is None or not prompt.strip():
        raise FeatspecError("empty prompt: pass --prompt TEXT or --prompt-file PATH")

    lm = load_model(args.target, args.dtype)
    tok = lm.tokenizer
    if not has_chat_template(tok):
        print(f"featspec: {args.target} has no chat template; using the prompt as plain text", file=sys.stderr)
    ids = encode_messages(tok, [{"role": "user", "content": prompt}])
    drafter = build_drafter(args.method, lm, _draft_options(args))
    gen = SpeculativeGenerator(TargetModel(lm.model), drafter, eos_token_ids(lm.model, tok), tok)
    if len(ids) >= gen.target.max_length:
        raise FeatspecError(f"prompt has {len(ids)} tokens but the context window is {gen.target.max_length}: shorten the prompt")

    hf = HFMethod("hf", lm, sampling) if args.compare else None
    if hf is not None:  # warm both paths up so neither pays one-time costs in the comparison
        hf.run(ids, 8, args.seed)
        gen.generate(ids, 8, sampling, seed=args.seed)

    shown = ""

    def stream(_tok: int) -> None:
        nonlocal shown
        text = tok.decode(res_ids, skip_special_tokens=True)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    res_ids: list[int] = []

    def on_token(t: int) -> None:
        res_ids.append(t)
        if not args.no_stream:
            stream(t)

    res = gen.generate(ids, args.max_new_tokens, sampling, seed=args.seed, stop_strings=tuple(args.stop), on_token=on_token)
    text = tok.decode(res.new_ids, skip_special_tokens=True)
    if args.no_stream:
        sys.stdout.write(text)
    elif text.startswith(shown):
        sys.stdout.write(text[len(shown):])
    print()
    tau = f", tau {res.tau:.2f}" if res.tau is not None and args.method != "vanilla" else ""
    line = (f"[{drafter.name}] {len(res.new_ids)} tokens in {res.total_s:.2f} s = {res.tokens_per_s:.1f} tok/s{tau}"
            f" ({args.target}, {args.dtype}, stop: {res.stop_reason})")
    if hf is not None:
        rec = hf.run(ids, args.max_new_tokens, args.seed)
        hf_tps = len(rec.new_ids) / rec.seconds
        same = "yes" if rec.new_ids == res.new_ids else "no"
        line += f" | HF generate {hf_tps:.1f} tok/s | speedup {res.tokens_per_s / hf_tps:.2f}x | same tokens as HF: {same}"
    print(line)
    return 0


def cmd_bench(args) -> int:
    from featspec.bench.datasets import load_dataset
    from featspec.bench.methods import parse_methods
    from featspec.bench.report import markdown_table, write_json, write_plot
    from featspec.bench.runner import run_bench
    from featspec.drafters import check_lookup
    from featspec.models import load_model

    sampling = _sampling(args)
    methods = parse_methods(args.methods)
    for m in methods:
        check_lookup(m, args.lookup)
    samples = load_dataset(args.dataset, args.limit)
    lm = load_model(args.target, args.dtype)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report = run_bench(
        lm, samples, methods, args.max_new_tokens, sampling, seed=args.seed,
        opts=_draft_options(args), warmup=args.warmup,
        config_extra={"dataset": args.dataset, "limit": args.limit, "started": started,
                      "command": "featspec " + " ".join(sys.argv[1:])},
    )
    json_path = Path(args.json)
    write_json(report, json_path)
    table = markdown_table(report)
    json_path.with_suffix(".md").write_text(table + "\n")
    write_plot(report, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would bury featspec's own output
    hf_logging.set_verbosity_error()
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "xmodal":
            from featspec.crossmodal.cli import run as run_xmodal

            return run_xmodal(args)
    except FeatspecError as exc:
        print(f"featspec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featspec: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
