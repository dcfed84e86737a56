"""``python -m bench soak``: does the server keep its shape over a day of speakers?

The server runs as ops run it: ``voicegrow serve`` in its own process (``--in-process`` to share this
one), on the embedded stores or on a MySQL database, Redis prefix and S3 bucket of its own
(``--stores services``). Simulated speakers of both protocols (``bench load``'s crowd), each from
its own loopback address, stream their microphones in real time: most stay silent, a share asks a
question every so often and sometimes talks over the reply, and every speaker hangs up and dials
again every minute or two. Every few seconds the server's resident memory, open file descriptors
and threads are read from ``/proc`` (and, in-process, its live trio tasks).

A leak is a slope. After a warm-up (caches, pools and lazily loaded models fill up; default the
first 2 minutes, or 20 % of a shorter run) the RSS series is fitted by least squares and the run
fails (exit 1) when the slope exceeds ``--rss-slope-bound`` MB per minute; fds, threads and tasks
must not grow beyond a small slack (the lowest value of the last third of the samples against the
lowest of the first third: a sample may land in a burst, but the floor only rises when something is
kept). Every question must be answered. With ``--trace-frames`` the server traces its Python
allocations (``MEMORY_TRACE_FRAMES``): the baseline is taken when the warm-up ends, and the report
lists the allocation sites that grew most since, which is where a slope comes from, or, when the
traced total stays flat while RSS climbs, says that the growth is outside Python's objects.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
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
)
from bench.load import Behaviour, Crowd, add_crowd_options, add_server_options, prepare_utterances, server_figures
from bench.stores import STORE_KINDS, bench_stores

__all__ = ["COUNTED", "growth_verdicts", "main", "rss_slope", "run_soak", "soak_failures"]

#: Sampled counts checked for growth of their floor: key, label.
COUNTED = (
    ("fds", "open file descriptors"),
    ("threads", "threads"),
    ("server_tasks", "trio tasks (server)"),
)


def rss_slope(samples: Sequence[dict[str, Any]], warmup_s: float, key: str = "rss_mb") -> dict[str, Any]:
    """Least-squares slope of ``key`` (MB) per minute over the samples after warm-up, with the fit's
    standard error and the first and last fitted values; None figures with fewer than 3 samples."""
    points = [(s["t_s"], s[key]) for s in samples if s["t_s"] >= warmup_s and s.get(key) is not None]
    if len(points) < 3:
        return {"samples": len(points), "slope_mb_per_min": None, "stderr_mb_per_min": None,
                "fit_start_mb": None, "fit_end_mb": None}
    t = np.array([p[0] for p in points]) / 60.0
    y = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(t, y, 1)
    residual = y - (slope * t + intercept)
    spread = float(np.sum((t - t.mean()) ** 2))
    stderr = math.sqrt(float(np.sum(residual ** 2)) / (len(t) - 2) / spread) if spread > 0 else None
    return {"samples": len(points), "slope_mb_per_min": float(slope), "stderr_mb_per_min": stderr,
            "fit_start_mb": float(slope * t[0] + intercept), "fit_end_mb": float(slope * t[-1] + intercept),
            "min_mb": float(y.min()), "max_mb": float(y.max())}


def growth_verdicts(samples: Sequence[dict[str, Any]], warmup_s: float, bounds: dict[str, float]) -> dict[str, Any]:
    """Per count: the floor after warm-up, the floor at the end, the growth, and whether it is within bound.

    Floors are the lowest values of the first and the last third of the post-warm-up samples.
    """
    post = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {}
    for key, _label in COUNTED:
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


def soak_failures(verdicts: dict[str, Any], slope: dict[str, Any], *, answered: int, unanswered: int) -> list[str]:
    """Why the soak failed (empty: it passed): the RSS slope first, then each count that grew beyond its
    bound, then a run with no reply or with questions left unanswered. A figure without a verdict
    (``ok`` None: too few samples) fails nothing."""
    failures = [key for key, v in verdicts.items() if v["ok"] is False]
    if slope["ok"] is False:
        failures.insert(0, "rss_slope")
    if not answered:
        failures.append("no_replies")
    if unanswered:
        failures.append("unanswered_questions")
    return failures


async def _sample(server: ServerUnderTest, crowd: Crowd, started: float) -> dict[str, Any]:
    process = server.process()
    metrics = await server.metrics()
    memory = await server.memory_report(limit=0)
    malloc = (memory or {}).get("malloc") or {}
    collections = ((memory or {}).get("gc") or {}).get("collections")
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
        # glibc's view: memory in use by the program vs freed but kept in the arenas (fragmentation).
        "malloc_in_use_mb": malloc["in_use_bytes"] / 2**20 if malloc else None,
        "malloc_free_held_mb": malloc["free_held_bytes"] / 2**20 if malloc else None,
        "gc_full_collections": collections[2] if collections else None,
        # The speakers' own memory, when it is not mixed into the server's: a creeping generator is ours.
        "generator_rss_mb": sample_process(os.getpid()).rss_bytes / 2**20 if server.mode != "in-process" else None,
    }


def _server_overrides(args: argparse.Namespace, stores: dict[str, str], mode: str) -> dict[str, str]:
    overrides = {**stores, **parse_overrides(args.set)}
    if mode != "url":
        overrides.setdefault("ADMIN_TOKEN", secrets.token_hex(16))  # the memory report is for the admin only
        if args.trace_frames:
            overrides.setdefault("MEMORY_TRACE_FRAMES", str(args.trace_frames))
    return overrides


def _loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "").startswith("127.")


async def run_soak(args: argparse.Namespace, clips: Sequence[Clip]) -> dict[str, Any]:
    mode = "url" if args.url else ("in-process" if args.in_process else "subprocess")
    duration_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(120.0, 0.2 * duration_s)
    with tempfile.TemporaryDirectory(prefix="voicegrow-soak-") as work:
        async with bench_stores("embedded" if mode == "url" else args.stores, Path(work)) as stores:
            overrides = _server_overrides(args, stores, mode)
            async with server_under_test(mode, fake_ai=None if args.url else FakeAiKnobs.from_args(args),
                                         overrides=overrides, url=args.url, http_url=args.http_url,
                                         pid=args.server_pid, admin_token=args.admin_token) as server:
                return await _soak(args, server, clips, mode, duration_s, warmup_s)


async def _soak(args: argparse.Namespace, server: ServerUnderTest, clips: Sequence[Clip], mode: str,
                duration_s: float, warmup_s: float) -> dict[str, Any]:
    settings = assumed_settings(server, args.env_file)
    reconnect_after = (args.reconnect_min_s, args.reconnect_max_s) if args.reconnect_max_s > 0 else None
    behaviour = Behaviour(gap_s=(args.gap_min_s, args.gap_max_s), barge_in=args.barge_in, reconnect=args.reconnect,
                          reconnect_after_s=reconnect_after, talker_share=args.talker_share,
                          xiaoai_share=args.xiaoai_share, reply_timeout_s=args.reply_timeout_s)
    xiaoai = args.xiaoai_share > 0
    addresses = args.addresses if _loopback(server.ws_url) else 1
    crowd = Crowd(server.ws_url, prepare_utterances(clips, settings), behaviour, seed=7, xiaoai=xiaoai,
                  addresses=addresses)
    samples: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    traced = False
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
                if not traced and sample["t_s"] >= warmup_s and args.trace_frames:
                    traced = await server.memory_baseline()
        metrics_end = await server.metrics()
        memory = await server.memory_report(limit=args.trace_top if traced else 0)
        release = await server.memory_release() if args.release_at_end else None
        nursery.cancel_scope.cancel()
    bounds = {"fds": args.fd_slack, "threads": args.thread_slack, "server_tasks": args.task_slack}
    verdicts = growth_verdicts(samples, warmup_s, bounds)
    slope = rss_slope(samples, warmup_s)
    allocator = {key: rss_slope(samples, warmup_s, key)["slope_mb_per_min"]
                 for key in ("malloc_in_use_mb", "malloc_free_held_mb")}
    slope["bound_mb_per_min"] = args.rss_slope_bound
    slope["ok"] = None if slope["slope_mb_per_min"] is None else slope["slope_mb_per_min"] <= args.rss_slope_bound
    server_side = server_figures(metrics_start, metrics_end)
    answered, asked, unanswered = totals.get("replies", 0), totals.get("utterances", 0), totals.get("no_reply", 0)
    failures = soak_failures(verdicts, slope, answered=answered, unanswered=unanswered)
    return {"server_mode": mode, "stores": "embedded" if mode == "url" else args.stores, "xiaoai_speakers": xiaoai,
            "source_addresses": addresses, "duration_s": duration_s, "warmup_s": warmup_s,
            "questions": {"asked": asked, "answered": answered, "unanswered": unanswered},
            "samples": samples, "rss": slope, "allocator_slopes_mb_per_min": allocator, "verdicts": verdicts,
            "memory": memory, "release": release, "activity": totals,
            "turn_latency_s": percentiles(latencies), "server": server_side, "errors": errors,
            "failures": failures, "passed": not failures}


# -- output -----------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    rss = results["rss"]
    slope = rss["slope_mb_per_min"]
    rss_state = "-" if rss["ok"] is None else ("ok" if rss["ok"] else "**GREW**")
    verdict_rows = [["RSS (MB), least-squares slope per minute", fmt(rss["fit_start_mb"], 1), fmt(rss["fit_end_mb"], 1),
                     "-" if slope is None else f"{slope:+.3f}/min ± {fmt(rss['stderr_mb_per_min'], 3)}",
                     f"{rss['bound_mb_per_min']:g}/min", str(rss["samples"]), rss_state]]
    for key, label in COUNTED:
        v = results["verdicts"][key]
        state = "-" if v["ok"] is None else ("ok" if v["ok"] else "**GREW**")
        verdict_rows.append([f"{label} (floor, first vs last third)", fmt(v["start"]), fmt(v["end"]),
                             "-" if v["growth"] is None else f"{v['growth']:+.0f}", fmt(v["bound"]),
                             str(v["samples"]), state])
    samples = results["samples"]
    step = max(1, math.ceil(len(samples) / 12))
    series_rows = [[fmt(s["t_s"]), fmt(s["rss_mb"], 1), fmt(s["fds"]), fmt(s["threads"]), fmt(s["server_tasks"]),
                    fmt(s["sessions_server"]), fmt(s["asr_queue"]), fmt(s["turn_latency_p50_s"], 2)]
                   for s in samples[::step]]
    a = results["activity"]
    q = results["questions"]
    turns = results["server"].get("turns", {})
    latency = results["turn_latency_s"]
    activity = (f"{args.sessions} speakers for {results['duration_s'] / 60:g} min ({results['server_mode']} server, "
                f"{results['stores']} stores, {results['source_addresses']} source addresses, warm-up "
                f"{results['warmup_s']:g} s): {q['asked']} questions, {q['answered']} answered, {q['unanswered']} "
                f"unanswered; {a.get('barge_ins', 0)} barge-ins, {a.get('reconnects', 0)} reconnects; server turns "
                f"completed {fmt(turns.get('completed'))}, interrupted {fmt(turns.get('interrupted'))}, failed "
                f"{fmt(turns.get('failed'))}, empty {fmt(turns.get('empty'))}; turn latency p50 "
                f"{fmt(latency['p50'], 2)} s, p99 {fmt(latency['p99'], 2)} s.")
    verdict = "PASSED" if results["passed"] else f"FAILED ({', '.join(results['failures'])})"
    if results["errors"]:
        activity += f" Speaker errors (connection refused or dropped): {results['errors']}."
    parts = [f"## Soak: {verdict}", "", activity, "",
             markdown_table(["resource (after warm-up)", "start", "end", "growth", "allowed", "samples", "verdict"],
                            verdict_rows),
             "",
             markdown_table(["t (s)", "RSS MB", "fds", "threads", "trio tasks (server)", "sessions", "ASR queue",
                             "turn latency p50 s"], series_rows)]
    allocator = results["allocator_slopes_mb_per_min"]
    if allocator["malloc_in_use_mb"] is not None:
        arenas = (results.get("memory") or {}).get("malloc_arenas")
        parts += ["", f"glibc allocator after warm-up: in use {allocator['malloc_in_use_mb']:+.3f} MB/min, held free "
                  f"in its arenas {allocator['malloc_free_held_mb']:+.3f} MB/min (Python's small objects live in "
                  "pymalloc's own arenas, outside both)"
                  + (f"; {arenas} arenas at the end." if arenas else ".")]
    release = results.get("release")
    if release:
        mb = 2**20
        trimmed = release["rss_after_trim_bytes"]
        parts += ["", f"At the end, a full garbage collection freed {release['gc_collected_objects']} objects "
                  f"(RSS {release['rss_before_bytes'] / mb:.1f} → {release['rss_after_gc_bytes'] / mb:.1f} MB, "
                  f"allocator in use {release['malloc_before']['in_use_bytes'] / mb:.1f} → "
                  f"{release['malloc_after_gc']['in_use_bytes'] / mb:.1f} MB)"
                  + (f"; malloc_trim(0) then {trimmed / mb:.1f} MB." if trimmed else ".")]
    memory = (results.get("memory") or {}).get("tracing")
    if memory:
        mb = 2**20
        growth = memory.get("rss_growth_bytes")
        parts += ["", f"Allocation tracing ({memory['frames']} frame(s)), {memory['seconds_since_baseline']:g} s since "
                  f"the baseline: traced Python memory {memory['traced_growth_bytes'] / mb:+.2f} MB, RSS "
                  f"{'-' if growth is None else f'{growth / mb:+.2f}'} MB (tracer's own "
                  f"{memory['tracer_overhead_bytes'] / mb:.1f} MB). Top growth sites:", "",
                  markdown_table(["site", "size diff (KB)", "count diff"],
                                 [[_short(t["site"]), f"{t['size_diff_bytes'] / 1024:+.1f}", f"{t['count_diff']:+d}"]
                                  for t in memory["top"]])]
    return "\n".join(parts)


def _short(site: str) -> str:
    """``…/site-packages/x/y.py:12`` as ``x/y.py:12``; the repository's own files relative to it."""
    for marker in ("site-packages/", "/voicegrow/", "/bench/"):
        if marker in site:
            head = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return head + site.split(marker, 1)[1]
    return site


def plot(results: dict[str, Any], path: Path) -> None:
    """Every sampled series against time, the warm-up shaded, the RSS fit drawn over its series."""
    plt = pyplot()
    samples = results["samples"]
    t = [s["t_s"] for s in samples]
    panels = [("rss_mb", "RSS (MB)")] + [(key, label) for key, label in COUNTED
                                        if any(s.get(key) is not None for s in samples)]
    panels.append(("sessions_server", "sessions (server)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.1 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        ax.plot(t, [math.nan if s.get(key) is None else s[key] for s in samples], "-", linewidth=1.2)
        ax.axvspan(0, results["warmup_s"], color="grey", alpha=0.15)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    rss = results["rss"]
    if rss["slope_mb_per_min"] is not None:
        fit_t = [x for x in t if x >= results["warmup_s"]]
        axes[0, 0].plot([fit_t[0], fit_t[-1]], [rss["fit_start_mb"], rss["fit_end_mb"]], "r--", linewidth=1,
                        label=f"fit {rss['slope_mb_per_min']:+.3f} MB/min")
        axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("seconds (shaded: warm-up)")
    axes[0, 0].set_title(f"Soak: {'passed' if results['passed'] else 'FAILED'}")
    save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=40, help="simulated speakers (default 40)")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="seconds before growth counts (default: 120, or 20%% of a shorter run)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--stores", choices=STORE_KINDS, default="embedded",
                        help="embedded (SQLite, in-process state, local audio) or services (a MySQL database, "
                             "Redis prefix and S3 bucket of the run's own; default embedded)")
    parser.add_argument("--rss-slope-bound", type=float, default=0.2,
                        help="allowed RSS slope after warm-up, MB per minute (default 0.2)")
    parser.add_argument("--fd-slack", type=float, default=16, help="allowed growth of open fds (default 16)")
    parser.add_argument("--thread-slack", type=float, default=4, help="allowed growth of threads (default 4)")
    parser.add_argument("--task-slack", type=float, default=32, help="allowed growth of trio tasks (default 32)")
    parser.add_argument("--talker-share", type=float, default=0.25,
                        help="share of speakers asking questions; the others stream silence (default 0.25)")
    parser.add_argument("--barge-in", type=float, default=0.3, help="chance of talking over a reply (default 0.3)")
    parser.add_argument("--reconnect", type=float, default=0.0,
                        help="chance of reconnecting right after a turn (default 0)")
    parser.add_argument("--reconnect-min-s", type=float, default=60.0,
                        help="hang up and redial after this long connected, at least (default 60)")
    parser.add_argument("--reconnect-max-s", type=float, default=150.0,
                        help="... at most (default 150; 0: no timed reconnects)")
    parser.add_argument("--reply-timeout-s", type=float, default=60.0,
                        help="a question not answered within this is unanswered (default 60)")
    parser.add_argument("--addresses", type=int, default=40,
                        help="loopback source addresses the speakers dial from (default 40)")
    parser.add_argument("--trace-frames", type=int, default=1,
                        help="frames per traced allocation in the server (MEMORY_TRACE_FRAMES; 0: no tracing; "
                             "default 1)")
    parser.add_argument("--release-at-end", action="store_true",
                        help="after the run, ask the server for a full garbage collection and malloc_trim(0), "
                             "and report what each gave back")
    parser.add_argument("--trace-top", type=int, default=15, help="growth sites reported (default 15)")
    add_server_options(parser, default="subprocess")
    add_crowd_options(parser, gap_s=(15.0, 40.0))
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.sessions < 1 or args.gap_min_s > args.gap_max_s:
        parser.error("--minutes, --sample-s and --sessions must be positive, --gap-min-s ≤ --gap-max-s")
    if not 0 <= args.talker_share <= 1 or args.reconnect_min_s > args.reconnect_max_s > 0 or args.addresses < 1:
        parser.error("--talker-share is a share from 0 to 1, --reconnect-min-s ≤ --reconnect-max-s, --addresses ≥ 1")
    if not 0 <= args.trace_frames <= 100 or not 1 <= args.trace_top <= 200:
        parser.error("--trace-frames from 0 to 100, --trace-top from 1 to 200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("soak", args, run_soak, clip_count=12, render=render_markdown, plot=plot,
                       passed=lambda results: results["passed"])


if __name__ == "__main__":
    raise SystemExit(main())
