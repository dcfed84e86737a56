"""``python -m bench COMMAND``: latency, pauses, load, asr, soak, ingest, storm, echo."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "latency": "bench.latency",
    "pauses": "bench.pauses",
    "load": "bench.load",
    "asr": "bench.asr",
    "soak": "bench.soak",
    "tts": "bench.tts",
    "ingest": "bench.ingest",
    "storm": "bench.storm",
    "echo": "bench.echo",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m bench {" + ",".join(COMMANDS) + "} [options]   (see bench/README.md)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
