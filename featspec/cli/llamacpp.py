"""`featspec llamacpp fetch | build | check`: the pinned llama.cpp beside featspec (docs/llamacpp.md)."""

from __future__ import annotations


def add_parser(sub) -> None:
    lc = sub.add_parser("llamacpp", help="the pinned llama.cpp: fetch its source, build it, or check the shipped head in it")
    lc.add_argument("action", choices=("fetch", "build", "check"),
                    help="fetch: source only (enough for export --format gguf); build: llama-server and llama-bench "
                         "(about 12 minutes on 2 cores, once per CPU kind); check: make check-llamacpp")
    lc.add_argument("--json", default=None, help="check: also write the report here")
    lc.add_argument("--head", default=None, help="check: an EAGLE-3 head directory (default: the shipped head)")
    lc.add_argument("--no-sweep", dest="sweep", action="store_false", help="check: skip the draft-flag sweeps")

    lc.set_defaults(run=run)


def run(args) -> int:
    from featspec.llamacpp import source

    if args.action == "fetch":
        print(source.fetch())
    elif args.action == "build":
        print(source.build())
    else:
        from featspec.llamacpp.check import run_check

        return run_check(json_path=args.json, head=args.head, sweep_flags=args.sweep)
    return 0
