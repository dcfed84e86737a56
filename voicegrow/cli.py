"""The ``voicegrow`` command: ``serve``, ``config``, ``admin-token``, ``talk``, ``version`` (and ``worker``,
which ``serve`` starts WORKERS times when WORKERS is over 1)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from voicegrow import __version__
from voicegrow.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from voicegrow.workers.context import WorkerContext

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicegrow", description="Streaming voice-assistant server.")
    parser.add_argument("--env-file", default=".env", help="optional KEY=value file read under the environment")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the WebSocket server and the HTTP API")
    config = sub.add_parser("config", help="print the effective settings, secrets masked")
    config.add_argument("--json", action="store_true", help="one JSON object instead of KEY=value lines")
    sub.add_parser("admin-token", help="print the admin API token (made in DATA_DIR if ADMIN_TOKEN is unset)")
    sub.add_parser("talk", help="talk to a server with a WAV file (see: voicegrow talk -h)", add_help=False)
    sub.add_parser("version", help="print the version")
    worker = sub.add_parser("worker", help="(internal) one of WORKERS processes, started by serve")
    for name in ("index", "count", "ws-fd", "http-fd", "parent-fd", "restarts"):
        worker.add_argument(f"--{name}", type=int, required=name != "restarts", default=0)
    worker.add_argument("--run-dir", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "talk":
        from voicegrow.talk import main as talk_main

        return talk_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "version":
        print(__version__)
        return 0
    if args.command not in ("serve", "config", "admin-token", "worker"):
        parser.print_help()
        return 2
    try:
        settings = load_settings(env_file=args.env_file)
    except ConfigError as exc:
        print(f"voicegrow: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "admin-token":
        return _print_admin_token(settings)
    if args.command == "config":
        masked = settings.masked()
        if args.json:
            print(json.dumps(masked, indent=2, ensure_ascii=False))
        else:
            for key, value in masked.items():
                print(f"{key}={value}")
        return 0

    from voicegrow.allocator import limit_arenas

    arena_max = limit_arenas()  # before any thread asks glibc for an arena of its own (docs/memory.md)

    import trio

    from voicegrow.logsetup import configure_logging

    worker = _worker_context(args) if args.command == "worker" else None
    configure_logging("DEBUG" if settings.debug else settings.log_level, settings.log_format,
                      worker=None if worker is None else worker.index)
    if arena_max is not None:
        logging.getLogger(__name__).info("malloc arenas limited to %d (MALLOC_ARENA_MAX unset)", arena_max)
    if worker is None and settings.workers > 1:
        from voicegrow.workers.supervisor import Supervisor

        return trio.run(Supervisor(settings, args.env_file).run)
    from voicegrow.app import serve

    try:
        return trio.run(serve, settings, worker)
    except ConfigError as exc:  # found while starting, e.g. an unreadable DEVICE_CREDENTIALS_FILE
        print(f"voicegrow: configuration error: {exc}", file=sys.stderr)
        return 2


def _print_admin_token(settings: Settings) -> int:
    """The token alone on stdout (``curl -H "Authorization: Bearer $(voicegrow admin-token)"``), where it
    lives on stderr."""
    if settings.admin_token:
        print("voicegrow: the admin token is ADMIN_TOKEN from the environment", file=sys.stderr)
        print(settings.admin_token)
        return 0
    from voicegrow.admin_auth import ensure_admin_token

    try:
        token, path, created = ensure_admin_token(settings.data_dir)
    except ConfigError as exc:
        print(f"voicegrow: configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"voicegrow: admin token {'created in' if created else 'from'} {path}", file=sys.stderr)
    print(token)
    return 0


def _worker_context(args: argparse.Namespace) -> WorkerContext:
    from pathlib import Path

    from voicegrow.workers.context import WorkerContext

    return WorkerContext(index=args.index, count=args.count, run_dir=Path(args.run_dir), ws_fd=args.ws_fd,
                         http_fd=args.http_fd, parent_fd=args.parent_fd, restarts=args.restarts)


if __name__ == "__main__":
    raise SystemExit(main())
