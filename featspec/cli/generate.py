"""`featspec generate`: one reply, streamed, with speed statistics (and with --compare, HF generate beside it)."""

from __future__ import annotations

import sys

from featspec.cli.common import add_model_args, draft_options, load_target, sampling_config, settle_dtype
from featspec.errors import FeatspecError


def add_parser(sub) -> None:
    from featspec.drafters import DRAFT_METHODS

    g = sub.add_parser("generate", help="generate a reply, streaming it, with speed statistics")
    add_model_args(g)
    g.add_argument("--prompt", help="user message (rendered with the tokenizer's chat template when it has one)")
    g.add_argument("--prompt-file", help="read the user message from this file")
    g.add_argument("--method", default=None,
                   help=f"drafter: {', '.join(DRAFT_METHODS)} (default eagle3 when featspec ships a head for the "
                        "target, else ngram)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--compare", action="store_true",
                   help="also run HF generate on the same prompt and print a one-line speed comparison")
    g.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of streaming it")

    g.set_defaults(run=run)


def run(args) -> int:
    from featspec.bench.methods import HFMethod
    from featspec.drafters import DRAFT_METHODS, SHIPPED_HEADS, check_lookup
    from featspec.models.target import TargetModel
    from featspec.models.tokens import encode_messages, has_chat_template
    from featspec.drafters.runtime import build_generator

    sampling = sampling_config(args)
    if args.method is None:
        args.method = "eagle3" if (SHIPPED_HEADS / args.target / "eagle3" / "config.json").exists() else "ngram"
    if args.method not in DRAFT_METHODS:
        raise FeatspecError(f"unknown method '{args.method}': use one of {', '.join(DRAFT_METHODS)}")
    check_lookup(args.method, args.lookup)
    if args.prompt_file:
        from featspec.validate import read_text

        prompt = read_text(args.prompt_file, "--prompt-file")
    else:
        prompt = args.prompt
    if prompt is None or not prompt.strip():
        raise FeatspecError("empty prompt: pass --prompt TEXT or --prompt-file PATH")

    lm = load_target(args, args.method)
    tok = lm.tokenizer
    if not has_chat_template(tok):
        print(f"featspec: {args.target} has no chat template; using the prompt as plain text", file=sys.stderr)
    ids = encode_messages(tok, [{"role": "user", "content": prompt}])
    window = TargetModel(lm.model).max_length
    if len(ids) >= window:
        raise FeatspecError(f"prompt has {len(ids)} tokens but the context window is {window}: shorten the prompt")
    dtype_note = settle_dtype(args, lm, args.method)
    gen = build_generator(args.method, lm, draft_options(args))

    hf = HFMethod("hf", lm, sampling) if args.compare else None
    if hf is not None:  # warm both paths up so neither pays one-time costs in the comparison
        hf.run(ids, 16, args.seed)
        gen.generate(ids, 16, sampling, seed=args.seed)

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
    plain = f", {res.plain_steps} of {len(res.steps)} steps plain (guard)" if res.plain_steps else ""
    line = (f"[{gen.drafter.name}] {len(res.new_ids)} tokens in {res.total_s:.2f} s = {res.tokens_per_s:.1f} tok/s{tau}{plain}"
            f" ({args.target}, {dtype_note}, stop: {res.stop_reason})")
    if hf is not None:
        rec = hf.run(ids, args.max_new_tokens, args.seed)
        hf_tps = len(rec.new_ids) / rec.seconds
        line += f" | HF generate {hf_tps:.1f} tok/s | speedup {res.tokens_per_s / hf_tps:.2f}x"
        print(line)
        print(_exactness(args, lm, ids, res.new_ids, rec.new_ids, sampling))
        return 0
    print(line)
    return 0


def _exactness(args, lm, ids: list[int], ours: list[int], hf_ids: list[int], sampling) -> str:
    """A true line about exactness: greedy output equals HF's, or why it need not in bf16, with the fp32 check."""
    import torch

    if not sampling.greedy:
        return "exactness: sampled output is distributed as the target's (checked by the test suite's statistical tests), not token-equal to HF's draws"
    if ours == hf_ids:
        return f"exactness: token-identical to HF generate ({len(ours)} tokens, {str(lm.dtype).replace('torch.', '')})"
    if lm.dtype == torch.float32:
        return f"exactness: DIFFERS from HF generate in float32 ({_first_diff(ours, hf_ids)}): please report this as a bug"
    from featspec.bench.methods import HFMethod
    from featspec.models import load_model
    from featspec.drafters.runtime import build_generator

    note = (f"exactness: in {str(lm.dtype).replace('torch.', '')} the output differs from HF generate "
            f"({_first_diff(ours, hf_ids)}): bf16 kernels round a batched verify and a one-token step differently, "
            "so both are the target's greedy output up to that rounding")
    lm32 = load_model(args.target, "float32")
    gen32 = build_generator(args.method, lm32, draft_options(args))
    ours32 = gen32.generate(ids, args.max_new_tokens, sampling, seed=args.seed).new_ids
    ref32 = HFMethod("hf", lm32, sampling).run(ids, args.max_new_tokens, args.seed).new_ids
    verdict = (f"token-identical ({len(ours32)} tokens)" if ours32 == ref32
               else f"DIFFERS ({_first_diff(ours32, ref32)}): please report this as a bug")
    return note + f"; float32 check on the same prompt, featspec vs HF generate: {verdict}"


def _first_diff(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i} of {max(len(a), len(b))}"
