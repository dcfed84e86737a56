"""``python -m bench asr``: stock ``transcribe()`` against the fast engine, side by side, in one run.

Both use the same loaded model, compute type and threads. The order is interleaved (stock, fast,
stock, fast, ...) after a warm-up of each, so that whatever else the machine is doing at a given
moment hits both engines alike. Per clip: latency and character error rate; per language: mean
latency, mean CER and the speed ratio, and whether the target of the ASR issue holds (fast at least
3.0× faster, CER at most 0.02 above stock). A Markdown table goes to stdout, progress to stderr, and
``--json`` keeps every figure with the machine and settings it came from.

Last measured (``python -m bench asr --repeat 3``: base from the PyPI wheels, int8, 2 threads, beam 1,
30 fixture clips × 3 passes, on the 2-core dev machine shared with other work, load average 1.2–3.3):

    lang  stock mean (s)  fast mean (s)  speed-up  stock CER  fast CER  ΔCER
    zh    0.985           0.283          3.48×     0.106      0.123     +0.017
    en    1.207           0.293          4.12×     0.024      0.032     +0.008

Both meet the target. The zh difference is one character on one clip (zh-04, which both engines get
mostly wrong); an earlier run under heavier load gave 3.22× (zh) and 3.46× (en), same CERs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from voicegrow.audio import read_wav

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The issue's target, per language.
TARGET_SPEEDUP = 3.0
TARGET_CER_MARGIN = 0.02


def default_clips_dir() -> Path:
    """The shared speech fixtures: ``$VOICEGROW_FIXTURES`` or the repository's sibling ``shared/``."""
    return Path(os.environ.get("VOICEGROW_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures" / "audio")


@dataclass(frozen=True)
class Clip:
    id: str
    lang: str
    text: str
    pcm: np.ndarray

    @property
    def duration_s(self) -> float:
        return self.pcm.shape[0] / 16_000


def load_clips(clips_dir: Path) -> list[Clip]:
    """Every clip of ``manifest.json`` (16 kHz mono s16 WAV), in manifest order."""
    manifest = json.loads((clips_dir / "manifest.json").read_text(encoding="utf-8"))
    clips = []
    for entry in manifest:
        pcm, rate = read_wav(clips_dir / entry["file"])
        if rate != 16_000:
            raise SystemExit(f"{entry['file']}: expected 16 kHz audio, got {rate} Hz")
        clips.append(Clip(entry["id"], entry["lang"], entry["text"], pcm))
    return clips


def cer(ref: str, hyp: str, lang: str) -> float:
    """Character error rate after the project's normalization (voicegrow.textmetrics)."""
    from voicegrow.textmetrics import char_error_rate

    return float(char_error_rate(ref, hyp, lang))


def load_model(model: str, compute_type: str, threads: int) -> tuple[Any, Any]:
    """The resolved model and the loaded ``WhisperModel`` (never downloads)."""
    from voicegrow.pipeline.asr import get_model
    from voicegrow.pipeline.asr_models import resolve_model

    resolved = resolve_model(model)
    if resolved.note:
        print(f"note: {resolved.note}", file=sys.stderr)
    return resolved, get_model(resolved, "cpu", compute_type, threads)


def machine_info() -> dict[str, Any]:
    versions = {}
    for dist in ("faster-whisper", "ctranslate2", "numpy", "opencc-python-reimplemented"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench asr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=Path, default=None, help="directory with manifest.json and WAVs")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--model", default="base", help="model size (resolved offline; default base)")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="passes over the clips (default 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from voicegrow.pipeline.asr import FastEngine, StockEngine

    args = _parse(argv)
    clips_dir = args.clips or default_clips_dir()
    clips = load_clips(clips_dir)
    if not clips:
        print(f"no clips in {clips_dir}", file=sys.stderr)
        return 2
    info = machine_info()
    resolved, model = load_model(args.model, args.compute_type, args.threads)
    engines = {
        "stock": StockEngine(model, "auto", args.beam_size),
        "fast": FastEngine(model, "auto", args.beam_size),
    }
    for engine in engines.values():  # warm-up: first calls allocate buffers and read the tables
        engine.transcribe(clips[0].pcm, clips[0].lang)

    rows: list[dict[str, Any]] = []
    order = ("stock", "fast")
    with tqdm(total=len(clips) * args.repeat * 2, desc="asr", unit="run", file=sys.stderr) as bar:
        for rep in range(args.repeat):
            for index, clip in enumerate(clips):
                row: dict[str, Any] = {"id": clip.id, "lang": clip.lang, "ref": clip.text, "pass": rep,
                                       "duration_s": round(clip.duration_s, 3)}
                # Alternate which engine goes first so neither always runs on a warmer cache.
                for name in order if (index + rep) % 2 == 0 else order[::-1]:
                    t = engines[name].transcribe(clip.pcm, clip.lang)
                    row[name] = {"text": t.text, "latency_s": t.elapsed_s, "cer": cer(clip.text, t.text, clip.lang),
                                 "engine": t.engine, "dropped": t.dropped, "no_speech_prob": t.no_speech_prob}
                    bar.update()
                rows.append(row)

    summary = summarize(rows)
    print(render_markdown(rows, summary, resolved, args))
    if args.json:
        report = {
            "settings": {"model": args.model, "resolved": vars_of(resolved), "compute_type": args.compute_type,
                         "threads": args.threads, "beam_size": args.beam_size, "repeat": args.repeat,
                         "clips": str(clips_dir), "window": window_settings()},
            "machine": info,
            "summary": summary,
            "clips": rows,
        }
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(s["target_met"] for s in summary.values()) else 1


def vars_of(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def window_settings() -> dict[str, Any]:
    from voicegrow.pipeline import asr

    return {"floor_frames": asr.WINDOW_FLOOR_FRAMES, "padding_frames": asr.WINDOW_PADDING_FRAMES,
            "round_frames": asr.WINDOW_ROUND_FRAMES, "max_fast_s": asr.MAX_FAST_SECONDS}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per language: mean latency and CER of each engine, the speed ratio, and the target verdict."""
    out: dict[str, dict[str, Any]] = {}
    for lang in sorted({r["lang"] for r in rows}, key=lambda x: (x != "zh", x)):
        sel = [r for r in rows if r["lang"] == lang]
        s: dict[str, Any] = {"clips": len({r["id"] for r in sel}), "runs": len(sel)}
        for name in ("stock", "fast"):
            lat = [r[name]["latency_s"] for r in sel]
            s[name] = {"mean_latency_s": statistics.fmean(lat), "median_latency_s": statistics.median(lat),
                       "max_latency_s": max(lat), "mean_cer": statistics.fmean(r[name]["cer"] for r in sel),
                       "dropped": sum(1 for r in sel if r[name]["dropped"])}
        s["speedup"] = s["stock"]["mean_latency_s"] / s["fast"]["mean_latency_s"]
        s["cer_delta"] = s["fast"]["mean_cer"] - s["stock"]["mean_cer"]
        s["target_met"] = s["speedup"] >= TARGET_SPEEDUP and s["cer_delta"] <= TARGET_CER_MARGIN
        out[lang] = s
    return out


def render_markdown(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]], resolved: Any,
                    args: argparse.Namespace) -> str:
    lines = [
        f"## ASR: stock transcribe() vs fast engine — model {resolved.name} ({resolved.source}), "
        f"{args.compute_type}, {args.threads} threads, beam {args.beam_size}",
        "",
        "| lang | clips × passes | stock latency (s) | fast latency (s) | speed-up | stock CER | fast CER | ΔCER "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lang, s in summary.items():
        lines.append(
            f"| {lang} | {s['clips']} × {s['runs'] // s['clips']} | {s['stock']['mean_latency_s']:.3f} | {s['fast']['mean_latency_s']:.3f} "
            f"| {s['speedup']:.2f}× | {s['stock']['mean_cer']:.3f} | {s['fast']['mean_cer']:.3f} "
            f"| {s['cer_delta']:+.3f} | {'met' if s['target_met'] else 'NOT met'} |")
    lines += [
        "",
        f"Target: fast ≥ {TARGET_SPEEDUP:.1f}× faster than stock and CER ≤ stock + {TARGET_CER_MARGIN:.2f}, "
        "per language.",
        "",
        "| clip | s | stock (s) | fast (s) | stock CER | fast CER | stock text | fast text |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        st, fa = r["stock"], r["fast"]
        lines.append(
            f"| {r['id']} | {r['duration_s']:.1f} | {st['latency_s']:.3f} | {fa['latency_s']:.3f} "
            f"| {st['cer']:.3f} | {fa['cer']:.3f} | {_cell(st)} | {_cell(fa)} |")
    return "\n".join(lines)


def _cell(result: dict[str, Any]) -> str:
    text = result["text"].replace("|", "\\|")
    return f"({result['dropped']})" if result["dropped"] else text


if __name__ == "__main__":
    raise SystemExit(main())
