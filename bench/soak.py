"""``python -m bench soak``: does the server keep its shape over time?

Simulated speakers (the crowd of ``bench load``) talk for a while — replies, barge-ins over replies,
hang-ups and reconnects — and every few seconds the server's resident memory, open file descriptors,
threads and (in-process) live trio tasks are sampled. A leak is a slope, so after a warm-up (caches,
pools and lazily loaded models fill up; default the first 2 minutes, or 20 % of a shorter run) the
lowest value of the last third of the samples is compared with the lowest of the first third: lows,
because a sample may land in a burst (a reconnect, a turn in flight) but the floor only rises when
something is kept. The run fails (exit 1) when RSS grows more than ``--rss-bound-mb`` or a count
grows more than its slack, or when nothing was answered at all.

The server runs in this process by default, in its own task, so its trio task tree can be counted
apart from the speakers' (an orphaned turn or session task is the first sign of a leak, long before
memory shows it); RSS then includes the speakers, whose memory is bounded by design (a fresh
emulator per connection, fixed-size histograms). ``--server-process`` samples a ``voicegrow serve``
subprocess instead (RSS, fds and threads from ``/proc``; no task count, and nothing new is exposed).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    BenchError,
    Clip,
    FakeAiKnobs,
    ServerUnderTest,
    add_common_options,
    assumed_settings,
    count_tasks,
    fmt,
    markdown_table,
    parse_overrides,
    percentiles,
    progress,
    pyplot,
    run_command,
    sample_process,
    save_figure,
    server_under_test,
    xiaoai_driver_present,
)
from bench.load import Behaviour, Crowd, add_crowd_options, add_server_options, prepare_utterances, server_figures

__all__ = ["RESOURCES", "growth_verdicts", "main", "run_soak"]

#: Sampled series checked for growth: key, label, default slack option.
RESOURCES = (
    ("rss_mb", "RSS (MB)"),
    ("fds", "open file descriptors"),
    ("threads", "threads"),
    ("server_tasks", "trio tasks (server)"),
)


def growth_verdicts(samples: Sequence[dict[str, Any]], warmup_s: float, bounds: dict[str, float]) -> dict[str, Any]:
    """Per resource: the floor after warm-up, the floor at the end, the growth, and whether it is within bound.

    Floors are the lowest values of the first and the last third of the post-warm-up samples.
    """
    post = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {}
    for key, _label in RESOURCES:
        values = [s[key] for s in post if s.get(key) is not None]
        if len(values) < 3:
            out[key] = {"samples": len(values), "start": None, "end": None, "growth": None,
                        "bound": bounds[key], "ok": None}
            continue
        third = max(1, len(values) // 3)
        start, end = min(values[:third]), min(values[-third:])
        growth = end - start
        out[key] = {"samples": len(values), "start": start, "end": end, "growth": growth, "bound": bounds[key],
                    "ok": growth <= bounds[key], "max": max(values)}
    return out


async def _sample(server: ServerUnderTest, crowd: Crowd, started: float) -> dict[str, Any]:
    process = server.process()
    metrics = await server.metrics()
    return {
        "t_s": trio.current_time() - started,
        "rss_mb": process.rss_bytes / 2**20 if process else None,
        "fds": process.fds if process else None,
        "threads": process.threads if process else None,
        "cpu_s": process.cpu_s if process else None,
        "server_tasks": server.live_tasks(),
        "all_tasks": count_tasks(trio.lowlevel.current_root_task()) if server.mode == "in-process" else None,
        "sessions_server": metrics.total("voicegrow_sessions_active") if metrics else None,
        "sessions_connected": sum(crowd.connected.values()),
        "asr_queue": metrics.total("voicegrow_asr_queue_depth") if metrics else None,
        # The speakers' own memory, when it is not mixed into the server's: a creeping generator is ours.
        "generator_rss_mb": sample_process(os.getpid()).rss_bytes / 2**20 if server.mode != "in-process" else None,
    }


async def run_soak(args: argparse.Namespace, clips: Sequence[Clip]) -> dict[str, Any]:
    mode = "url" if args.url else ("subprocess" if args.server_process else "in-process")
    duration_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(120.0, 0.2 * duration_s)
    async with server_under_test(mode, fake_ai=None if args.url else FakeAiKnobs.from_args(args),
                                 overrides=parse_overrides(args.set), url=args.url, http_url=args.http_url,
                                 pid=args.server_pid, admin_token=args.admin_token) as server:
        settings = assumed_settings(server, args.env_file)
        behaviour = Behaviour(gap_s=(args.gap_min_s, args.gap_max_s), barge_in=args.barge_in,
                              reconnect=args.reconnect, xiaoai_share=args.xiaoai_share)
        xiaoai = args.xiaoai_share > 0 and (mode == "url" or xiaoai_driver_present())
        crowd = Crowd(server.ws_url, prepare_utterances(clips, settings), behaviour, seed=7, xiaoai=xiaoai)
        samples: list[dict[str, Any]] = []
        totals: dict[str, int] = {}
        errors: dict[str, int] = {}
        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            await crowd.populate(nursery, args.sessions, ramp_s=min(5.0, 0.05 * args.sessions))
            metrics_start = await server.metrics()
            started = trio.current_time()
            with progress(math.ceil(duration_s), "soak", "s") as bar:
                while (elapsed := trio.current_time() - started) < duration_s:
                    await trio.sleep(min(args.sample_s, duration_s - elapsed))
                    server.forget_ai_requests()
                    sample = await _sample(server, crowd, started)
                    window = crowd.take_stats()
                    for key, value in window.figures().items():
                        if isinstance(value, int):
                            totals[key] = totals.get(key, 0) + value
                    for name, count in window.errors.items():
                        errors[name] = errors.get(name, 0) + count
                    latencies += window.latencies_s
                    sample["turn_latency_p50_s"] = percentiles(window.latencies_s)["p50"]
                    samples.append(sample)
                    bar.update(min(math.ceil(sample["t_s"]), bar.total) - bar.n)
                    if server.pid is not None and sample["rss_mb"] is None:
                        raise BenchError("server_died", "the server process is gone")
            metrics_end = await server.metrics()
            nursery.cancel_scope.cancel()
    bounds = {"rss_mb": args.rss_bound_mb, "fds": args.fd_slack, "threads": args.thread_slack,
              "server_tasks": args.task_slack}
    verdicts = growth_verdicts(samples, warmup_s, bounds)
    server_side = server_figures(metrics_start, metrics_end)
    answered = totals.get("replies", 0)
    failures = [key for key, v in verdicts.items() if v["ok"] is False]
    if not answered:
        failures.append("no_replies")
    return {"server_mode": mode, "xiaoai_speakers": xiaoai, "duration_s": duration_s, "warmup_s": warmup_s,
            "samples": samples, "verdicts": verdicts, "activity": totals, "turn_latency_s": percentiles(latencies),
            "server": server_side, "errors": errors, "failures": failures, "passed": not failures}


# -- output -----------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    verdict_rows = []
    for key, label in RESOURCES:
        v = results["verdicts"][key]
        digits = 1 if key == "rss_mb" else 0
        state = "-" if v["ok"] is None else ("ok" if v["ok"] else "**GREW**")
        verdict_rows.append([label, fmt(v["start"], digits), fmt(v["end"], digits),
                             "-" if v["growth"] is None else f"{v['growth']:+.{digits}f}", fmt(v["bound"], digits),
                             str(v["samples"]), state])
    samples = results["samples"]
    step = max(1, math.ceil(len(samples) / 12))
    series_rows = [[fmt(s["t_s"]), fmt(s["rss_mb"], 1), fmt(s["fds"]), fmt(s["threads"]), fmt(s["server_tasks"]),
                    fmt(s["sessions_server"]), fmt(s["asr_queue"]), fmt(s["turn_latency_p50_s"], 2)]
                   for s in samples[::step]]
    a = results["activity"]
    turns = results["server"].get("turns", {})
    latency = results["turn_latency_s"]
    activity = (f"{args.sessions} speakers for {results['duration_s'] / 60:g} min ({results['server_mode']} server, "
                f"warm-up {results['warmup_s']:g} s): {a.get('utterances', 0)} utterances, {a.get('replies', 0)} "
                f"replies heard, {a.get('barge_ins', 0)} barge-ins, {a.get('reconnects', 0)} reconnects, "
                f"{a.get('no_reply', 0)} unanswered; server turns completed {fmt(turns.get('completed'))}, "
                f"interrupted {fmt(turns.get('interrupted'))}, failed {fmt(turns.get('failed'))}, "
                f"empty {fmt(turns.get('empty'))}; turn latency p50 {fmt(latency['p50'], 2)} s, "
                f"p99 {fmt(latency['p99'], 2)} s.")
    verdict = "PASSED" if results["passed"] else f"FAILED ({', '.join(results['failures'])})"
    if results["errors"]:
        activity += f" Speaker errors (connection refused or dropped): {results['errors']}."
    return "\n".join([
        f"## Soak: {verdict}", "", activity, "",
        markdown_table(["resource (floor of first vs last third after warm-up)", "start", "end", "growth",
                        "allowed", "samples", "verdict"], verdict_rows),
        "",
        markdown_table(["t (s)", "RSS MB", "fds", "threads", "trio tasks (server)", "sessions", "ASR queue",
                        "turn latency p50 s"], series_rows),
    ])


def plot(results: dict[str, Any], path: Path) -> None:
    """Every sampled series against time, the warm-up shaded."""
    plt = pyplot()
    samples = results["samples"]
    t = [s["t_s"] for s in samples]
    panels = [(key, label) for key, label in RESOURCES if any(s.get(key) is not None for s in samples)]
    panels.append(("sessions_server", "sessions (server)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.1 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        ax.plot(t, [math.nan if s.get(key) is None else s[key] for s in samples], "-", linewidth=1.2)
        ax.axvspan(0, results["warmup_s"], color="grey", alpha=0.15)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds (shaded: warm-up)")
    axes[0, 0].set_title(f"Soak: {'passed' if results['passed'] else 'FAILED'}")
    save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="simulated speakers (default 50)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="seconds before growth counts (default: 120, or 20%% of a shorter run)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--rss-bound-mb", type=float, default=20.0, help="allowed RSS growth (default 20 MB)")
    parser.add_argument("--fd-slack", type=float, default=16, help="allowed growth of open fds (default 16)")
    parser.add_argument("--thread-slack", type=float, default=4, help="allowed growth of threads (default 4)")
    parser.add_argument("--task-slack", type=float, default=32, help="allowed growth of trio tasks (default 32)")
    parser.add_argument("--barge-in", type=float, default=0.3, help="chance of talking over a reply (default 0.3)")
    parser.add_argument("--reconnect", type=float, default=0.2, help="chance of reconnecting after a turn (default 0.2)")
    add_server_options(parser, default="in-process")
    add_crowd_options(parser, gap_s=(5.0, 20.0))
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.sessions < 1 or args.gap_min_s > args.gap_max_s:
        parser.error("--minutes, --sample-s and --sessions must be positive, --gap-min-s ≤ --gap-max-s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("soak", args, run_soak, clip_count=12, render=render_markdown, plot=plot,
                       passed=lambda results: results["passed"])


if __name__ == "__main__":
    raise SystemExit(main())
