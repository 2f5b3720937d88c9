"""`featspec xmodal prepare | eval | show`: the cross-modal world from the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from featspec.errors import FeatspecError

SPLIT_CHOICES = ("train", "val", "test", "novel")


def add_parser(sub) -> None:
    x = sub.add_parser("xmodal", help="cross-modal world: event-camera drafter and video target (prepare, eval, show)")
    xs = x.add_subparsers(dest="xmodal_command", required=True, parser_class=type(x))
    p = xs.add_parser("prepare", help="generate clips and train both mini models (resumes from checkpoints in --out)")
    p.add_argument("--out", default=None, help="run directory (default ~/.cache/featspec/xmodal)")
    p.add_argument("--tiny", action="store_true", help="a minute-scale run with cut-down models (tests, smoke checks)")
    p.add_argument("--n-train", type=int, default=None, help="training clips (default 3000; --tiny 24)")
    p.add_argument("--seed", type=int, default=0, help="world seed: a different seed is a different distribution")
    for name, helptext in (("eval", "answer accuracy per attribute, visual tokens and prefill latency of both models"),
                           ("show", "one clip's frames, event images, question and both answers as a PNG")):
        e = xs.add_parser(name, help=helptext)
        e.add_argument("--models", default=None, help="directory with target/ and drafter/ (default: the shipped minis)")
        e.add_argument("--split", choices=SPLIT_CHOICES, default="test")
        e.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
        if name == "eval":
            e.add_argument("--limit", type=int, default=200, help="clips to evaluate (default 200)")
            e.add_argument("--max-new-tokens", type=int, default=64)
            e.add_argument("--json", default=None, help="write the report (with every answer) here")
        else:
            e.add_argument("--index", type=int, default=0, help="clip index within the split")
            e.add_argument("--out", required=True, help="PNG path")


def _models(args) -> Path:
    from featspec.crossmodal.evaluate import default_models_dir

    return Path(args.models).expanduser() if args.models else default_models_dir()


def run(args) -> int:
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[getattr(args, "dtype", "bfloat16")]
    if args.xmodal_command == "prepare":
        from featspec.crossmodal.scenes import WorldConfig
        from featspec.crossmodal.train import PrepareConfig, prepare
        from featspec.models.registry import cache_root

        out = Path(args.out).expanduser() if args.out else cache_root() / "xmodal"
        cfg = PrepareConfig.tiny(out) if args.tiny else PrepareConfig(out=out)
        cfg.world = WorldConfig(seed=args.seed)
        if args.n_train is not None:
            if args.n_train < 8:
                raise FeatspecError(f"--n-train must be >= 8, got {args.n_train}")
            cfg.n_train = args.n_train
        t0 = time.time()
        report = prepare(cfg)
        print(f"prepared {out}: target and drafter trained in {time.time() - t0:.0f} s "
              f"(visual tokens {report['target']['visual_tokens']} vs {report['drafter']['visual_tokens']}); "
              f"evaluate with `featspec xmodal eval --models {out}`")
        return 0
    if args.xmodal_command == "eval":
        from featspec.crossmodal.evaluate import evaluate, report_markdown

        if args.limit < 1:
            raise FeatspecError(f"--limit must be >= 1, got {args.limit}")
        result = evaluate(_models(args), args.split, args.limit, dtype, args.max_new_tokens)
        print(report_markdown(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        return 0
    if args.xmodal_command == "show":
        from featspec.crossmodal.show import show

        if args.index < 0:
            raise FeatspecError(f"--index must be >= 0, got {args.index}")
        info = show(_models(args), args.split, args.index, Path(args.out), dtype)
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
        print(f"wrote {args.out}")
        return 0
    raise FeatspecError(f"unknown xmodal command {args.xmodal_command}")
