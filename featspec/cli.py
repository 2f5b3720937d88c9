"""featspec command line: generate and bench (train / export / xmodal come with later issues)."""

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
    g.add_argument("--method", default="ngram", help=f"drafter: {', '.join(DRAFT_METHODS)} (default ngram)")
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
    return parser


def _sampling(args):
    from featspec.sampling import SamplingConfig

    if args.max_new_tokens < 1:
        raise FeatspecError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def cmd_generate(args) -> int:
    from featspec.bench.methods import HFMethod
    from featspec.drafters import DRAFT_METHODS, build_drafter
    from featspec.engine import SpeculativeGenerator, eos_token_ids
    from featspec.models import TargetModel, load_model
    from featspec.prompts import encode_messages, has_chat_template

    sampling = _sampling(args)
    if args.method not in DRAFT_METHODS:
        raise FeatspecError(f"unknown method '{args.method}': use one of {', '.join(DRAFT_METHODS)}")
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
    drafter = build_drafter(args.method, lm, draft_model=args.draft_model, draft_length=args.draft_length)
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
    line = (f"[{args.method}] {len(res.new_ids)} tokens in {res.total_s:.2f} s = {res.tokens_per_s:.1f} tok/s{tau}"
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
    from featspec.models import load_model

    sampling = _sampling(args)
    methods = parse_methods(args.methods)
    samples = load_dataset(args.dataset, args.limit)
    lm = load_model(args.target, args.dtype)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report = run_bench(
        lm, samples, methods, args.max_new_tokens, sampling, seed=args.seed,
        draft_model=args.draft_model, draft_length=args.draft_length, warmup=args.warmup,
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
