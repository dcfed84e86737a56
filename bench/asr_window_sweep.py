"""Sweep of the fast engine's mel window: how small can it be, and how much silence must follow speech?

``python -m bench.asr_window_sweep [--clips DIR] [--json OUT]`` runs :class:`voicegrow.pipeline.asr.FastEngine`
over the fixture clips with

- A. a fixed window floor (no padding): 0 (window = utterance), 400 ... 3000 frames;
- B. no floor and N frames of padding after the utterance;
- C. utterances made by joining fixture clips (8–28 s), against stock ``transcribe()``, to find the
  length above which the fast path stops paying (or starts to lose words).

Rows report mean latency, mean CER and dropped outputs per language. Every clip runs every
configuration back to back, in a rotating order, so machine noise spreads evenly. The figures it
printed are quoted next to the constants in ``voicegrow/pipeline/asr.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.asr import Clip, cer, default_clips_dir, load_clips, load_model, machine_info

FLOORS = (0, 400, 600, 800, 900, 1000, 1200, 1500, 3000)
PADDINGS = (0, 100, 200, 500)
LONG_PADDINGS = (0, 100, 500)
LONG_TARGETS_S = (6, 10, 14, 18, 22, 26)


def joined_clips(clips: list[Clip]) -> list[Clip]:
    """Longer utterances: consecutive same-voice clips joined until each target length is passed."""
    out = []
    for prefix in ("zh-", "en-0"):
        group = [c for c in clips if c.id.startswith(prefix)]
        for target in LONG_TARGETS_S:
            parts: list[Clip] = []
            for c in group * 4:
                parts.append(c)
                if sum(p.duration_s for p in parts) >= target:
                    break
            sep = "" if prefix == "zh-" else " "
            out.append(Clip(f"{prefix}join{target}", parts[0].lang, sep.join(p.text for p in parts),
                            np.concatenate([p.pcm for p in parts])))
    return out


def _run_grid(clips: list[Clip], configs: dict[str, Any], model: Any, stock: Any, bar: Any) -> list[dict]:
    from voicegrow.pipeline.asr import FastEngine

    engines = {name: FastEngine(model, "auto", 1, window=policy, stock=stock) for name, policy in configs.items()}
    names = list(engines)
    rows = []
    for index, clip in enumerate(clips):
        row: dict[str, Any] = {"id": clip.id, "lang": clip.lang, "duration_s": clip.duration_s}
        rotated = names[index % len(names):] + names[:index % len(names)]
        for name in (["stock"] if stock is not None else []) + rotated:
            engine = stock if name == "stock" else engines[name]
            t = engine.transcribe(clip.pcm, clip.lang)
            row[name] = {"latency_s": t.elapsed_s, "cer": cer(clip.text, t.text, clip.lang), "text": t.text,
                         "dropped": t.dropped, "engine": t.engine}
            bar.update()
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict], names: list[str]) -> tuple[str, list[dict]]:
    langs = sorted({r["lang"] for r in rows}, key=lambda x: (x != "zh", x))
    lines = [f"### {title}", "", "| config | " + " | ".join(
        f"{lang} latency (s) | {lang} CER | {lang} dropped" for lang in langs) + " |",
        "|---|" + "---:|---:|---:|" * len(langs)]
    figures = []
    for name in names:
        cells = []
        fig: dict[str, Any] = {"config": name}
        for lang in langs:
            sel = [r[name] for r in rows if r["lang"] == lang]
            lat = statistics.fmean(x["latency_s"] for x in sel)
            err = statistics.fmean(x["cer"] for x in sel)
            dropped = sum(1 for x in sel if x["dropped"])
            cells.append(f"{lat:.3f} | {err:.3f} | {dropped}")
            fig[lang] = {"mean_latency_s": lat, "mean_cer": err, "dropped": dropped}
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        figures.append(fig)
    return "\n".join(lines), figures


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from voicegrow.pipeline.asr import StockEngine, WindowPolicy

    parser = argparse.ArgumentParser(prog="python -m bench.asr_window_sweep")
    parser.add_argument("--clips", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model", default="base")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-long", action="store_true", help="only parts A and B")
    args = parser.parse_args(argv)

    clips = load_clips(args.clips or default_clips_dir())
    resolved, model = load_model(args.model, args.compute_type, args.threads)
    stock = StockEngine(model, "auto", 1)
    unlimited = 10_000.0  # never hand over to stock inside the sweep
    grid_a = {f"floor {f}": WindowPolicy(floor_frames=f, padding_frames=0, round_frames=10, max_fast_s=unlimited)
              for f in FLOORS}
    grid_b = {f"pad {p}": WindowPolicy(floor_frames=0, padding_frames=p, round_frames=10, max_fast_s=unlimited)
              for p in PADDINGS}
    grid_c = {f"pad {p}": WindowPolicy(floor_frames=1000, padding_frames=p, round_frames=10, max_fast_s=unlimited)
              for p in LONG_PADDINGS}
    long_clips = [] if args.skip_long else joined_clips(clips)

    _warm_up(model, clips[0])
    total = len(clips) * (len(grid_a) + len(grid_b) + 1) + len(long_clips) * (len(grid_c) + 1)
    report: dict[str, Any] = {"machine": machine_info(), "model": resolved.name, "compute_type": args.compute_type,
                              "threads": args.threads}
    with tqdm(total=total, desc="sweep", unit="run", file=sys.stderr) as bar:
        rows_ab = _run_grid(clips, {**grid_a, **grid_b}, model, stock, bar)
        rows_c = _run_grid(long_clips, grid_c, model, stock, bar) if long_clips else []

    text, fig_a = _table("A. window floor, no padding (short clips, 2.0–3.5 s)", rows_ab, ["stock", *grid_a])
    print(text, "\n")
    text, fig_b = _table("B. padding after the utterance, no floor (short clips)", rows_ab, ["stock", *grid_b])
    print(text, "\n")
    report.update(floor=fig_a, padding=fig_b, rows=rows_ab)
    if rows_c:
        lines = ["### C. joined clips: stock vs fast (floor 1000), by padding", "",
                 "| clip | s | stock (s) | stock CER | " + " | ".join(f"{n} (s) | {n} CER" for n in grid_c) + " |",
                 "|---|---:|---:|---:|" + "---:|---:|" * len(grid_c)]
        for r in rows_c:
            cells = " | ".join(f"{r[n]['latency_s']:.3f} | {r[n]['cer']:.3f}" for n in grid_c)
            lines.append(f"| {r['id']} | {r['duration_s']:.1f} | {r['stock']['latency_s']:.3f} "
                         f"| {r['stock']['cer']:.3f} | {cells} |")
        print("\n".join(lines))
        report["long"] = rows_c
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def _warm_up(model: Any, clip: Clip) -> None:
    """First calls allocate buffers and read tables; keep that out of the first configuration's figures."""
    from voicegrow.pipeline.asr import FastEngine, StockEngine

    FastEngine(model, "auto").transcribe(clip.pcm, clip.lang)
    StockEngine(model, "auto").transcribe(clip.pcm, clip.lang)


if __name__ == "__main__":
    raise SystemExit(main())
