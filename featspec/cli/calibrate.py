"""`featspec calibrate`: this machine's cost model (verify cost per tree size, context and dtype; drafting cost)."""

from __future__ import annotations

from pathlib import Path

from featspec.cli.common import DTYPE_CHOICES, torch_dtype


def add_parser(sub) -> None:
    from featspec.models.registry import DEFAULT_TARGET

    c = sub.add_parser("calibrate", help="measure this machine's cost model (verify cost per tree size, context, dtype; "
                                         "drafting cost) and print the speedup ceiling it implies")
    c.add_argument("--target", default=DEFAULT_TARGET, help="model alias, local HF directory or hub id")
    c.add_argument("--method", default="eagle3", help="drafter whose cost is measured beside the target's (default eagle3; "
                                                     "one of vanilla, ngram, model, eagle1, eagle2, eagle3)")
    c.add_argument("--head", default=None, help="head directory for eagle methods (default: the shipped head)")
    c.add_argument("--dtype", choices=("both",) + DTYPE_CHOICES, default="both", help="dtypes to measure (default both)")
    c.add_argument("--force", action="store_true", help="measure again even when this machine's costs are cached")
    c.add_argument("--png", default="calibrate.png", help="where to draw the curves (default calibrate.png)")

    c.set_defaults(run=run)


def run(args) -> int:
    import torch

    from featspec.bench.calibrate import run_calibrate

    from featspec.validate import check_destination

    check_destination(args.png, "--png")
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [torch_dtype(args.dtype)]
    run_calibrate(args.target, args.method, args.head, dtypes, force=args.force, png=Path(args.png))
    return 0
