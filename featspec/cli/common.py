"""What every command shares: the one-line-error parser, the model and drafting flags, the dtype choices, and
loading a target in the dtype the run asked for (or the one this machine's cost model picks)."""

from __future__ import annotations

import argparse
import sys

from featspec.errors import FeatspecError
from featspec.validate import finite_float, nonneg_int, positive_int, seed

DTYPE_CHOICES = ("bfloat16", "float32")
RUN_DTYPES = ("auto",) + DTYPE_CHOICES


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit with code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def torch_dtype(name: str):
    """A --dtype choice as a torch dtype."""
    import torch

    return getattr(torch, name)


def command_line() -> str:
    """The command as the user typed it, for reports and model cards."""
    return "featspec " + " ".join(sys.argv[1:])


def add_model_args(p: argparse.ArgumentParser) -> None:
    from featspec.models.registry import ALIASES, DEFAULT_TARGET

    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"model alias ({', '.join(ALIASES)}), local HF directory or hub id (default {DEFAULT_TARGET})")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="auto",
                   help="auto (default): the dtype this machine's measured cost model predicts fastest (bfloat16 where "
                        "it is native: AMX, CUDA; float32 where it is emulated), with the reason printed; float32 for "
                        "bit-exact comparisons with HF generate")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=finite_float(0.0), default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens when sampling (0 = off)")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the one torch.Generator every draw uses")
    p.add_argument("--draft-model", default=None,
                   help="for method 'model': a model spec with the target's tokenizer, or layers:N for the target's "
                        "first N layers (default: a quarter of the target's layers)")
    p.add_argument("--draft-length", type=positive_int, default=4, help="tokens the 'model' drafter proposes per step")
    p.add_argument("--head", default=None,
                   help="for eagle1/eagle2/eagle3: head directory or hub id (default: the head featspec ships for the target)")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="eagle2/eagle3: dynamic tree depth (default 4; with --budget auto a ceiling, default 8)")
    p.add_argument("--topk", type=positive_int, default=4, help="eagle2/eagle3: children per expanded node (default 4)")
    p.add_argument("--total-tokens", type=positive_int, default=None,
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


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FeatspecError(f"{flag} {text!r}: give comma-separated integers like 4,12,24") from None


def draft_options(args):
    from featspec.drafters import DraftOptions

    return DraftOptions(draft_model=args.draft_model, draft_length=args.draft_length, head=args.head, depth=args.depth,
                        topk=args.topk, total_tokens=args.total_tokens, budget=args.budget, lookup=args.lookup,
                        guard=args.guard)


def load_target(args, method: str | None):
    """Load --target: in --dtype as given, or (auto) in float32 until `_settle_dtype` decides."""
    from featspec.models import load_model

    if args.head and method is not None and method.startswith("eagle"):
        from featspec.heads.checkpoint import resolve_head_dir

        resolve_head_dir(args.head)  # a missing head is said before a model loads or a machine is measured
    return load_model(args.target, "float32" if args.dtype == "auto" else args.dtype)


def settle_dtype(args, lm, method: str | None) -> str:
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
        opts = replace(draft_options(args), lookup=False)
        make = lambda m, costs: build_drafter(method, LoadedModel(lm.spec, m, lm.tokenizer), opts, costs)  # noqa: E731
    dtype, reason, _ = choose_dtype(lm.model, make)
    if dtype != torch.float32:
        lm.model.to(dtype)
    print(f"featspec: --dtype auto -> {reason}", file=sys.stderr, flush=True)
    return f"{str(dtype).replace('torch.', '')} (auto)"


def sampling_config(args):
    from featspec.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
