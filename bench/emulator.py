"""What the device emulators share: their error, and running one for the body of a block.

Each emulator (``xiaoai_emulator``, ``xiaozhi_emulator``) is an object with ``run(task_status=...)``,
which reports started once the device is connected and greeted, and ``aclose()``; :func:`running`
holds it connected for an ``async with`` body and closes it however the body ends.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import trio

__all__ = ["EmulatorError", "run_cli", "running"]


class EmulatorError(Exception):
    """The emulated device could not do what was asked (not connected, not recording, no server hello)."""


class _Emulator(Protocol):
    async def run(self, *, task_status: Any = ...) -> None: ...

    async def aclose(self) -> None: ...


E = TypeVar("E", bound=_Emulator)


@asynccontextmanager
async def running(emulator: E) -> AsyncIterator[E]:
    """``emulator`` connected for the body of the block, closed after it.

    A failure to connect is raised as the :class:`EmulatorError` itself, outside the nursery, so it is
    not wrapped in an ExceptionGroup."""
    failure: EmulatorError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(emulator.run)
        except EmulatorError as exc:
            failure = exc
        else:
            try:
                yield emulator
            finally:
                await emulator.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def run_cli(name: str, run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
            args: argparse.Namespace) -> int:
    """An emulator's command line: its summary as JSON on stdout, or its error on stderr with status 1."""
    try:
        summary = trio.run(run, args)
    except EmulatorError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return 0
