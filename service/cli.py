"""The `ptq4dm` console script: quantizer commands plus (later) the service's serve/worker."""

from __future__ import annotations

import argparse
import sys

from quantizer.cli import add_quantizer_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq4dm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantizer_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"ptq4dm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
