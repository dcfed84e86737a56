"""``python -m bench ingest``: does a second worker process keep a crowd's audio on time?

One run, one server subprocess per ``WORKERS`` value in turn (default 1 then 2), each under the same
load: a crowd of open-xiaoai speakers streaming their microphones in real time and never talking
(what a house full of idle speakers costs: 90 ms JSON frames, ``record`` tags, the VAD), plus one real
speaker that talks every few seconds with fixture clips and waits for each reply. Per run: the
server's frame-ingest lag p50/p99 (its own histogram, summed over the workers), the real speaker's
latency from end of speech to its first reply audio, server CPU and memory over its whole process
tree, and the load generator's own CPU (the generator is one Python process; when it runs out of
core, so do its frames, and the lag figures say more about the generator than the server).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    Clip,
    FakeAiKnobs,
    add_common_options,
    fmt,
    markdown_table,
    own_cpu_s,
    parse_overrides,
    progress,
    pyplot,
    run_command,
    save_figure,
    server_under_test,
)
from bench.load import Behaviour, Crowd, prepare_utterances, process_usage, server_figures, wait_until_idle

__all__ = ["main", "run_ingest"]

_NEVER = (1e9, 1e9)  # a crowd speaker's first utterance, in seconds: never within a run


def _worker_counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("worker counts must be positive")
    return values


async def _one_run(workers: int, args: argparse.Namespace, clips: Sequence[Clip], bar: Any) -> dict[str, Any]:
    overrides = {**parse_overrides(args.set), "WORKERS": str(workers)}
    async with server_under_test("subprocess", fake_ai=FakeAiKnobs.from_args(args), overrides=overrides,
                                 startup_timeout_s=180.0) as server:
        utterances = prepare_utterances(clips, server.settings)
        crowd = Crowd(server.ws_url, utterances, Behaviour(first_delay_s=_NEVER, gap_s=_NEVER, xiaoai_share=1.0),
                      seed=workers)
        talker = Crowd(server.ws_url, utterances,
                       Behaviour(first_delay_s=(1.0, 2.0), gap_s=(args.gap_s, args.gap_s), xiaoai_share=0.0),
                       seed=1000 + workers)
        cut_off = 0
        try:
            async with trio.open_nursery() as nursery:
                connected, measured = await _measure(nursery, server, crowd, talker, args, bar)
                nursery.cancel_scope.cancel()
        except* trio.TooSlowError as group:  # speakers still waiting for start_recording when the run ended
            cut_off = len(group.exceptions)
        await wait_until_idle(server)
    return {"workers": workers, "speakers": args.speakers, "connected": connected, **measured,
            "crowd_cut_off_waiting": cut_off}


async def _measure(nursery: trio.Nursery, server: Any, crowd: Crowd, talker: Crowd, args: argparse.Namespace,
                   bar: Any) -> tuple[int, dict[str, Any]]:
    """The crowd connects, settles; then the real speaker talks for the measured window."""
    connected = await crowd.populate(nursery, args.speakers, ramp_s=args.ramp_s)
    await trio.sleep(args.settle_s)  # the ramp's connect storm is not part of the figures
    ramp = crowd.take_stats()
    before, process_before, own_before = await server.metrics(), server.process(), own_cpu_s()
    started = trio.current_time()
    await talker.populate(nursery, 1, ramp_s=0.0)
    while (left := started + args.duration - trio.current_time()) > 0:
        await trio.sleep(min(1.0, left))
        bar.update(1)
    after, process_after, own_after = await server.metrics(), server.process(), own_cpu_s()
    wall = trio.current_time() - started
    real, background = talker.take_stats(), crowd.take_stats()
    figures = server_figures(before, after)
    rss = {dict(labels).get("worker", "?"): value for (name, labels), value in (after.samples.items() if after else ())
           if name == "voicegrow_worker_resident_memory_bytes"}
    return connected, {
        "duration_s": wall,
        "server": figures,
        "process": process_usage(process_before, process_after),
        "worker_rss_mb": {worker: value / 2**20 for worker, value in sorted(rss.items())},
        "generator_cpu_cores": (own_after - own_before) / wall,
        "real_speaker": real.figures(),
        "crowd": {**background.figures(), "ramp_connect_failures": ramp.connect_failures},
    }


async def run_ingest(args: argparse.Namespace, clips: Sequence[Clip]) -> dict[str, Any]:
    runs = []
    order = [workers for _ in range(args.repeat) for workers in args.workers]  # interleaved: 1, 2, 1, 2 …
    with progress(len(order) * int(args.duration), "ingest", "s") as bar:
        for workers in order:
            bar.set_postfix_str(f"WORKERS={workers}")
            runs.append(await _one_run(workers, args, clips, bar))
    return {"runs": runs}


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for run in results["runs"]:
        srv, proc, real = run["server"], run["process"], run["real_speaker"]
        latency = real["turn_latency_s"]
        rows.append([
            str(run["workers"]), f"{run['connected']}/{run['speakers']}", fmt(proc.get("cpu_cores"), 2),
            fmt(proc.get("rss_mb")), " + ".join(fmt(v) for v in run["worker_rss_mb"].values()) or "–",
            fmt(srv.get("ingest_lag_p50_s"), 1, 1000),
            ("≥" if srv.get("ingest_lag_p99_beyond_histogram") else "") + fmt(srv.get("ingest_lag_p99_s"), 1, 1000),
            fmt(srv.get("frames_dropped")),
            f"{run['crowd']['connect_failures'] + run['crowd']['dropped_connections'] + run['crowd_cut_off_waiting']}",
            f"{real['replies']}/{real['utterances']}",
            fmt(latency["p50"], 2), fmt(latency["max"], 2), fmt(run["generator_cpu_cores"], 2),
        ])
    header = ["WORKERS", "crowd connected", "server CPU (cores)", "RSS MB (all)", "RSS MB per worker",
              "ingest lag p50 ms", "ingest lag p99 ms", "frames dropped", "crowd speakers failed",
              "real speaker replies",
              "real speaker latency p50 s", "max s", "generator CPU (cores)"]
    return "\n".join([
        f"## Ingest: {args.speakers} idle open-xiaoai speakers streaming + one talking speaker, "
        f"{args.duration:g} s per run",
        "",
        markdown_table(header, rows),
    ])


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    labels = [f"WORKERS={r['workers']}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [(r["server"].get("ingest_lag_p99_s") or 0) * 1000 for r in runs])
    axes[0].set_title("frame-ingest lag p99 (ms)")
    axes[1].bar(labels, [r["real_speaker"]["turn_latency_s"]["p50"] or 0 for r in runs])
    axes[1].set_title("real speaker: end of speech → reply p50 (s)")
    save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=_worker_counts, default=[1, 2], help="WORKERS values, one run each (1,2)")
    parser.add_argument("--speakers", type=int, default=300, help="idle open-xiaoai speakers (default 300)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run (default 30)")
    parser.add_argument("--ramp-s", type=float, default=15.0, help="seconds over which the crowd connects")
    parser.add_argument("--settle-s", type=float, default=5.0, help="seconds between the ramp and the measurement")
    parser.add_argument("--gap-s", type=float, default=2.0, help="the real speaker's pause after each reply")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the --workers sequence this many times, interleaved (a noisy machine drifts)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.speakers < 1 or args.repeat < 1:
        parser.error("--duration, --speakers and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("ingest", args, run_ingest, clip_count=6, render=render_markdown, plot=plot,
                       passed=lambda results: all(r["connected"] == r["speakers"] for r in results["runs"]))


if __name__ == "__main__":
    sys.exit(main())
