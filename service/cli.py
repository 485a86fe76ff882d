"""The `ptq4dm` console script: the quantizer's commands plus the service's `serve` and `worker`."""

from __future__ import annotations

import argparse
import logging
import sys

from quantizer.cli import add_quantizer_commands


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting (PTQ4DM_X env var <-> --x flag); flags win over the environment."""
    from service.settings import ServiceSettings

    for name, field in ServiceSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=f"setting_{name}", default=None, metavar=name.upper(),
                            help=f"{field.description or ''} (env PTQ4DM_{name.upper()})".strip())


def _settings(args: argparse.Namespace):  # noqa: ANN202  (imports stay lazy for the quantizer commands)
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    given = {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return ServiceSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from service.runner import serve

    return serve(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from service.runner import worker

    return worker(_settings(args))


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API (with an in-process worker unless --redis-url is set)")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run a worker that consumes jobs from Redis")
    _settings_flags(worker)
    worker.set_defaults(func=cmd_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq4dm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantizer_commands(sub)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "worker"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"ptq4dm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
