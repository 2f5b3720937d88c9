"""featspec command line: one module per command, each adding its parser and the function that runs it.

`featspec.xmodal.cli` adds the cross-modal app's commands the same way; nothing else in the library imports
this package."""

from __future__ import annotations

import importlib
import sys

from featspec.cli.common import Parser
from featspec.errors import FeatspecError

COMMANDS = ("generate", "bench", "calibrate", "train", "export", "llamacpp")


def build_parser() -> Parser:
    parser = Parser(prog="featspec", description="Lossless speculative decoding for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"featspec.cli.{name}").add_parser(sub)
    from featspec.xmodal.cli import add_parser as add_xmodal

    add_xmodal(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C anywhere, imports and model loading included: one line, exit 130
        return _main(argv)
    except SystemExit as exc:  # argparse's errors (code 2) and --help (0), returned like every other outcome
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("featspec: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would bury featspec's own output
    hf_logging.set_verbosity_error()
    try:
        return args.run(args)
    except FeatspecError as exc:
        print(f"featspec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
