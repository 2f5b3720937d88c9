"""`featspec xmodal prepare | eval | show | train-adapter | train-eagle3 | adapters | bench` from the command line.

Each subcommand's parser names the function that runs it; ranges are argparse types (featspec.validate), so a
bad number is refused before any model loads."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from featspec.errors import FeatspecError
from featspec.io import write_json
from featspec.cli.common import DTYPE_CHOICES, torch_dtype
from featspec.validate import check_destination, finite_float, int_range, nonneg_int, positive_int, seed

SPLIT_CHOICES = ("train", "val", "test", "novel")


def add_parser(sub) -> None:
    x = sub.add_parser("xmodal", help="cross-modal world: event-camera drafter and video target (prepare, eval, show)")
    xs = x.add_subparsers(dest="xmodal_command", required=True, parser_class=type(x))
    p = xs.add_parser("prepare", help="generate clips and train both mini models (resumes from checkpoints in --out)")
    p.add_argument("--out", default=None, help="run directory (default ~/.cache/featspec/xmodal)")
    p.add_argument("--tiny", action="store_true", help="a minute-scale run with cut-down models (tests, smoke checks)")
    p.add_argument("--n-train", type=int_range(8), default=None, help="training clips (default 3000; --tiny 24)")
    p.add_argument("--seed", type=seed, default=0, help="world seed: a different seed is a different distribution")
    p.add_argument("--probe-steps", type=nonneg_int, default=None, help="target vision-tower pre-training steps (default 3000; the drafter's gets half; 0 with --init keeps the init towers)")
    p.add_argument("--qa-steps", type=positive_int, default=None, help="target QA steps of 4 clips x all their questions (default 350; the drafter gets 1.2x)")
    p.add_argument("--roles", choices=("both", "target", "drafter"), default="both", help="which models to train (default both)")
    p.add_argument("--keep-weight", type=finite_float(0.0, 100.0), default=0.5, help="weight of a probe loss on each model's visual "
                   "tokens during QA, keeping positions, motion and speed readable (default 0.5; 0 = off, docs/crossmodal.md)")
    p.add_argument("--grounding-turns", type=int_range(0, 32), default=None, help="short \"where is X in frame k?\" turns per target "
                   "training row, besides its questions (default 0; 8 was tried, docs/crossmodal.md)")
    p.add_argument("--attend-weight", type=finite_float(0.0, 100.0), default=None, help="weight of the target's attention guidance "
                   "during QA: at each coordinate a grounding turn quotes (--grounding-turns), attend to the named object's patches "
                   "in the named frame (default 0; 0.3 was tried, docs/crossmodal.md)")
    p.add_argument("--init", default=None, help="start each trained model from this run's (or the shipped) target/ and drafter/ weights")
    p.set_defaults(run=run_prepare)
    for name, helptext in (("eval", "answer accuracy per attribute, visual tokens and prefill latency of both models"),
                           ("show", "one clip's frames, event images, question and both answers as a PNG")):
        e = xs.add_parser(name, help=helptext)
        e.add_argument("--models", default=None, help="directory with target/ and drafter/ (default: the shipped minis)")
        e.add_argument("--split", choices=SPLIT_CHOICES, default="test")
        e.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")
        e.set_defaults(run=run_eval if name == "eval" else run_show)
        if name == "eval":
            e.add_argument("--limit", type=positive_int, default=200, help="clips to evaluate (default 200)")
            e.add_argument("--max-new-tokens", type=positive_int, default=64)
            e.add_argument("--json", default=None, help="write the report (with every answer) here")
        else:
            e.add_argument("--index", type=nonneg_int, default=0, help="clip index within the split")
            e.add_argument("--out", required=True, help="PNG path")
    add_drafting_parsers(xs)


def _add_work_args(e) -> None:
    e.add_argument("--models", default=None, help="directory with target/ and drafter/ (default: the shipped minis)")
    e.add_argument("--work", default=None, help="where aligned features and adapters go (default ~/.cache/featspec/xmodal-work)")
    e.add_argument("--adapters", default=None, help="adapter directory to read (default: the shipped ones, else WORK/adapters)")
    e.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16",
                   help="model dtype (features are aligned in it; adapters train in float32)")


def add_drafting_parsers(xs) -> None:
    """train-adapter, adapters (the table) and bench: cross-modal drafting on top of the world."""
    from featspec.xmodal.drafting.adapters import LEVELS
    from featspec.xmodal.bench import METHODS

    t = xs.add_parser("train-adapter", help="align features on train clips (cached) and train one adapter level")
    _add_work_args(t)
    t.add_argument("--level", choices=LEVELS, required=True)
    t.set_defaults(run=run_train_adapter)
    t.add_argument("--clips", type=int_range(2), default=600, help="train clips to align (default 600; cached per count)")
    t.add_argument("--steps", type=positive_int, default=600, help="optimizer steps (default 600)")
    t.add_argument("--val-clips", type=positive_int, default=50, help="val clips the saved adapter is scored on (default 50)")
    t.add_argument("--ce-weight", type=finite_float(0.0), default=0.0, help="add soft CE through the target's LM head (default 0)")
    e = xs.add_parser("train-eagle3", help="train an EAGLE-3 head on the video target's own features (option D, hybrid)")
    _add_work_args(e)
    e.set_defaults(run=run_train_eagle3)
    e.add_argument("--clips", type=int_range(8), default=3000, help="train clips (default 3000; every question kind of each)")
    e.add_argument("--steps", type=positive_int, default=400, help="optimizer steps, batch 8 (default 400; resumes)")
    a = xs.add_parser("adapters", help="the adapter table: cosine, Accept@t and top-1 agreement per level vs raw tokens")
    _add_work_args(a)
    a.set_defaults(run=run_adapters)
    a.add_argument("--split", choices=SPLIT_CHOICES, default="test")
    a.add_argument("--limit", type=positive_int, default=100, help="clips to align for the table (default 100)")
    a.add_argument("--json", default=None)
    b = xs.add_parser("bench", help="target alone vs cross-modal drafting, interleaved per clip after a warm-up")
    _add_work_args(b)
    b.set_defaults(run=run_bench)
    b.add_argument("--split", choices=SPLIT_CHOICES, default="test")
    b.add_argument("--limit", type=positive_int, default=20)
    b.add_argument("--methods", default="target,xmodal-token,xmodal-L1", help=f"comma list from {', '.join(METHODS)}")
    b.add_argument("--draft-length", type=positive_int, default=4, help="draft chain length per step (default 4)")
    b.add_argument("--max-new-tokens", type=positive_int, default=64)
    b.add_argument("--json", default="xmodal-bench.json")
    b.add_argument("--png", default=None, help="also plot speedup, tau and one clip's timeline per method here")
    b.add_argument("--seed", type=seed, default=None,
                   help="world seed of the clips (default: the one the models were trained on); a new seed is a fresh distribution")
    b.add_argument("--max-objects", type=int, choices=(1, 2, 3), default=None, help="objects per clip at most (default: the models' world)")
    b.add_argument("--spin-prob", type=finite_float(0.0, 1.0), default=None, help="chance an object spins in place instead of moving (0-1)")
    b.add_argument("--camera-shake", type=finite_float(0.0), default=None, help="whole-image jitter amplitude in pixels (0 = static camera)")


def _work(args) -> Path:
    from featspec.models.registry import cache_root

    return Path(args.work).expanduser() if args.work else cache_root() / "xmodal-work"


def _adapter_dir(args) -> Path:
    from featspec.xmodal.evaluate import SHIPPED

    if args.adapters:
        return Path(args.adapters).expanduser()
    return SHIPPED / "adapters" if (SHIPPED / "adapters").is_dir() and not args.work else _work(args) / "adapters"


def _pairs(args, stamps: dict[str, str], target, drafter, world, split: str, n: int):
    """Aligned pairs for the first n clips of a split, computed once per (models, dtype, split, n) and cached."""
    from featspec.xmodal.drafting.align import align, estimate_bytes, save_pairs
    from featspec.xmodal.world.clips import build_split

    key = f"{stamps['target'][:8]}{stamps['drafter'][:8]}-{args.dtype}"  # new weights or dtype, new pairs
    path = _work(args) / "pairs" / f"{split}-{n}-{key}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=False)
    size = estimate_bytes(n, 20, drafter.model.config.hidden_size, target.model.config.text_config.hidden_size,
                          target.visual_tokens)
    print(f"aligning {n} {split} clips (about {size / 1e6:.0f} MB at {path})", flush=True)
    pairs = align(target, drafter, build_split(world, split, n), n)
    save_pairs(pairs, path)
    return pairs


STAMP = "models.json"  # in an adapter directory: which minis its adapters and head were fit to


def _model_stamps(args) -> dict[str, str]:
    """What adapters, heads and aligned pairs are made from: a content hash of each mini's weights."""
    import hashlib

    stamps = {}
    for role in ("target", "drafter"):
        weights = _models(args) / role / "weights.safetensors"
        stamps[role] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.exists() else "none"
    return stamps


def _recorded_stamps(adir: Path) -> dict[str, str]:
    if (adir / STAMP).exists():
        return json.loads((adir / STAMP).read_text())
    legacy = adir / "target.sha256"  # stamps written before the drafter was recorded too
    return {"target": legacy.read_text().strip()} if legacy.exists() else {}


def _check_adapters(adir: Path, stamps: dict[str, str], roles: tuple[str, ...]) -> None:
    """Adapters map one drafter's features into one target's space, and the target's head drafts from that
    target's features: refuse them over other minis (roles names whose weights matter here)."""
    recorded = _recorded_stamps(adir)
    for role in roles:
        if recorded.get(role, stamps[role]) != stamps[role]:
            redo = "`train-adapter` (each level) and `train-eagle3`" if role == "target" else "`train-adapter` (each level)"
            raise FeatspecError(f"the adapters in {adir} were trained for another {role} (weights {recorded[role]}, "
                                f"these are {stamps[role]}): retrain with `featspec xmodal` {redo} into a fresh "
                                "--work, or pass --models with the minis they were made for")


def _stamp_adapters(adir: Path, stamps: dict[str, str], roles: tuple[str, ...]) -> None:
    write_json({**_recorded_stamps(adir), **{r: stamps[r] for r in roles}}, adir / STAMP)  # atomic
    (adir / "target.sha256").unlink(missing_ok=True)


def _models(args) -> Path:
    from featspec.xmodal.evaluate import default_models_dir

    return Path(args.models).expanduser() if args.models else default_models_dir()


def check_outputs(args) -> None:
    """Report and output paths are checked before any model loads or trains."""
    for flag in ("json", "png"):
        if getattr(args, flag, None):
            check_destination(getattr(args, flag), f"--{flag}")
    if args.xmodal_command == "show":
        check_destination(args.out, "--out")
    elif getattr(args, "out", None):
        check_destination(args.out, "--out", directory=True)


def run_prepare(args) -> int:
    from featspec.models.registry import cache_root
    from featspec.xmodal.evaluate import SHIPPED
    from featspec.xmodal.train.prepare import PrepareConfig, prepare
    from featspec.xmodal.world.scenes import WorldConfig

    check_outputs(args)
    out = Path(args.out).expanduser() if args.out else cache_root() / "xmodal"
    cfg = PrepareConfig.tiny(out) if args.tiny else PrepareConfig(out=out)
    cfg.world = WorldConfig(seed=args.seed)
    if args.probe_steps is not None:
        if args.probe_steps == 0 and args.init is None:
            raise FeatspecError("--probe-steps must be >= 1 (>= 0 with --init, which brings trained towers), got 0")
        cfg.probe_steps = {"video": args.probe_steps, "events": (args.probe_steps + 1) // 2}
    if args.qa_steps is not None:
        cfg.qa_steps = {"video": args.qa_steps, "events": (6 * args.qa_steps + 4) // 5}
    if args.n_train is not None:
        cfg.n_train = args.n_train
    cfg.roles = ("target", "drafter") if args.roles == "both" else (args.roles,)
    cfg.keep_weight = args.keep_weight
    if args.attend_weight is not None:
        cfg.attend_weight = args.attend_weight
    if args.grounding_turns is not None:
        cfg.grounding_turns = args.grounding_turns
    if args.init is not None:
        cfg.init = Path(args.init).expanduser()
        for role in cfg.roles:
            if not (cfg.init / role / "weights.safetensors").exists():
                raise FeatspecError(f"--init {cfg.init} has no {role}/weights.safetensors: point at a prepared run "
                                    f"(or {SHIPPED})")
    t0 = time.time()
    report = prepare(cfg)
    tokens = " vs ".join(str(report[r]["visual_tokens"]) for r in cfg.roles)
    print(f"prepared {out}: {' and '.join(cfg.roles)} trained in {time.time() - t0:.0f} s "
          f"(visual tokens {tokens}); evaluate with `featspec xmodal eval --models {out}`")
    return 0


def run_eval(args) -> int:
    from featspec.xmodal.evaluate import evaluate, report_markdown

    check_outputs(args)
    result = evaluate(_models(args), args.split, args.limit, torch_dtype(args.dtype), args.max_new_tokens)
    print(report_markdown(result))
    if args.json:
        write_json(result, args.json, indent=1)
        print(f"wrote {args.json}")
    return 0


def run_show(args) -> int:
    from featspec.xmodal.show import show

    check_outputs(args)
    info = show(_models(args), args.split, args.index, Path(args.out), torch_dtype(args.dtype))
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(f"wrote {args.out}")
    return 0


def _scene_options(args) -> dict:
    """The bench's --seed / scene options as WorldConfig changes (a user's fresh distribution; their ranges are
    argparse types, checked before any model loads)."""
    return {k: getattr(args, k) for k in ("seed", "max_objects", "spin_prob", "camera_shake") if getattr(args, k) is not None}


@dataclasses.dataclass
class Pair:
    """The two minis a drafting command works on, their world, and the content stamps of their weights."""

    target: object
    drafter: object
    world: object
    stamps: dict


def _pair(args) -> Pair:
    from featspec.xmodal.evaluate import load_pair

    check_outputs(args)
    target, drafter, world = load_pair(_models(args), torch_dtype(args.dtype))
    return Pair(target, drafter, world, _model_stamps(args))


def run_train_adapter(args) -> int:
    from featspec.xmodal.train.adapter import measure, save_adapter, train_adapter

    m = _pair(args)
    out = _work(args) / "adapters" / f"{args.level}.pt"
    _check_adapters(out.parent, m.stamps, ("target", "drafter"))  # one directory holds adapters for one pair
    pairs = _pairs(args, m.stamps, m.target, m.drafter, m.world, "train", args.clips)
    adapter, losses = train_adapter(args.level, pairs, m.target.model.lm_head, m.target.model.get_input_embeddings(),
                                    steps=args.steps, ce_weight=args.ce_weight)
    stats = measure(adapter, _pairs(args, m.stamps, m.target, m.drafter, m.world, "val", args.val_clips),
                    m.target.model.lm_head, m.drafter.model.lm_head)
    save_adapter(adapter, out, {"clips": args.clips, "steps": args.steps, "ce_weight": args.ce_weight,
                                "final_loss": sum(losses[-20:]) / len(losses[-20:]), "val": stats})
    _stamp_adapters(out.parent, m.stamps, ("target", "drafter"))
    print(f"{args.level}: val top-1 {stats['top1']:.3f}, cosine {stats['cosine']:.3f}, {stats['params']} params; wrote {out}")
    return 0


def run_train_eagle3(args) -> int:
    from featspec.xmodal.train.eagle_head import train_target_head
    from featspec.xmodal.world.clips import build_split

    m = _pair(args)
    head_dir = _work(args) / "adapters" / "eagle3"
    _check_adapters(head_dir.parent, m.stamps, ("target",))  # the head never sees the drafter
    rec = train_target_head(m.target, build_split(m.world, "train", args.clips), _work(args) / "target-eagle3", head_dir,
                            steps=args.steps)
    _stamp_adapters(head_dir.parent, m.stamps, ("target",))
    print(f"eagle3 head: {rec}; wrote {head_dir}")
    return 0


def _adapters(args, m: Pair) -> tuple[Path, dict]:
    """The adapter directory to read (checked against the minis) and its adapters by level."""
    from featspec.xmodal.drafting.adapters import LEVELS
    from featspec.xmodal.train.adapter import load_adapter

    adir = _adapter_dir(args)
    _check_adapters(adir, m.stamps, ("target", "drafter") if any(adir.glob("L*.pt")) else ("target",))
    embed = m.target.model.get_input_embeddings()
    return adir, {lv: load_adapter(adir / f"{lv}.pt", embed) for lv in LEVELS if (adir / f"{lv}.pt").exists()}


ADAPTER_COLUMNS = [("level", None, None), ("params", "params", "d"), ("ms/call", "latency_ms", ".2f"),
                   ("cosine", "cosine", ".3f"), *((f"A@{t:.2f}", f"accept@{t:.2f}", ".2f") for t in (0.80, 0.85, 0.90, 0.95)),
                   ("top-1", "top1", ".3f")]


def run_adapters(args) -> int:
    from featspec.bench.report import table
    from featspec.xmodal.train.adapter import measure

    m = _pair(args)
    _, adapters = _adapters(args, m)
    pairs = _pairs(args, m.stamps, m.target, m.drafter, m.world, args.split, args.limit)
    levels = {"token": measure(None, pairs, m.target.model.lm_head, m.drafter.model.lm_head)}
    for lv, ad in adapters.items():
        levels[lv] = measure(ad, pairs, m.target.model.lm_head, m.drafter.model.lm_head)
    print(table(ADAPTER_COLUMNS, {("raw drafter tokens" if lv == "token" else lv): r for lv, r in levels.items()}))
    if args.json:
        write_json({"split": args.split, "limit": args.limit, "levels": levels}, args.json, indent=1)
    return 0


def run_bench(args) -> int:
    from featspec.xmodal.bench import Kit, markdown, plot, run_bench as bench
    from featspec.xmodal.world.clips import build_split

    dtype = torch_dtype(args.dtype)
    m = _pair(args)
    adir, adapters = _adapters(args, m)
    for ad in adapters.values():
        ad.to(dtype)
    methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    head = None
    if (adir / "eagle3" / "config.json").exists():
        from featspec.heads.checkpoint import load_head

        head = load_head(adir / "eagle3", dtype=dtype).bind(m.target.model)
    kit = Kit(m.target, m.drafter, adapters, head, args.draft_length)
    world = dataclasses.replace(m.world, **_scene_options(args))
    result = bench(kit, build_split(world, args.split, args.limit + 1), methods, args.limit, args.max_new_tokens)
    print(markdown(result))
    write_json({"config": {k: v for k, v in vars(args).items() if k not in ("func", "run")}, "world": world.to_json(),
                "methods": result}, args.json, indent=1, default=str)
    print(f"wrote {args.json}")
    if args.png:
        plot(result, Path(args.png), f"xmodal bench: {args.split}, {args.limit} clips, {args.dtype}")
        print(f"wrote {args.png}")
    return 0
