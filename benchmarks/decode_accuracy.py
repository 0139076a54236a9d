"""Does the fast decode change what the model says? exact vs fast decode on camera-size JPEGs.

The demo's trained model (``int8_accuracy.demo_model``: the demo recipe, trained once and cached under
``--work``; its fp32 export at the demo's default η, chosen by ``sweep`` as ``cfvit demo`` chooses it)
classifies ``--count`` held-out images (default 1,020: the demo's validation draws and further
held-out draws of the same generator, class by class) re-rendered at 4000x3000 by
``camera_images.py``: crisp patterns at full resolution plus textured noise, saved as quality-92
JPEGs in memory (nothing is written to disk). Every image is decoded twice, with
``load_and_preprocess(..., decode="exact")`` (full decode + bicubic resize) and ``decode="fast"``
(JPEG draft mode, then the same resize), and both tensors run through the same pipeline.

Reported: top-1 and exit rate for both modes; the share of images whose top-1 *and* stage agree
between the modes; the pixel difference of the preprocessed tensors (mean and max absolute
difference per image, in 8-bit grey levels: normalised difference x std x 255); the decode time of
each mode (on a busy machine: labelled so). The decision rule of issue 25: ``fast`` may become the
default of ``infer`` and ``serve`` only if agreement >= 99% and the top-1 difference <= 0.5 points.

    python benchmarks/decode_accuracy.py [--work /tmp/cfvit-decode-acc] [--count 1020] [--out benchmarks/results/decode_accuracy]

Writes OUT/results.json (summary, settings, machine), OUT/images.csv (one row per image) and
OUT/README.md (the table).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import camera_images as cam  # noqa: E402
import int8_accuracy  # noqa: E402

from cfvit_deploy.io import atomic_write_path  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402
from cfvit_deploy.preprocessing import PreprocessConfig  # noqa: E402

MODES = ("exact", "fast")
#: Issue 25's rule for making fast the default: agreement and top-1 difference.
MIN_AGREEMENT, MAX_TOP1_DIFF_POINTS = 0.99, 0.5
BATCH = 32


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")


def demo_export(work: Path, quick: bool) -> tuple[Path, float, dict]:
    """The demo model's fp32 export (made once) and the demo's default η for it."""
    from exporters import export

    ckpt, data = int8_accuracy.demo_model(work, quick)
    fp32 = work / ("demo-quick-export" if quick else "demo-export")
    if not (fp32 / "manifest.json").is_file():
        export(ckpt, fp32, force=True)
    cached = work / f"{fp32.name}-eta.json"  # the sweep's choice, kept while the export is unchanged
    if cached.is_file() and cached.stat().st_mtime > (fp32 / "manifest.json").stat().st_mtime:
        choice = json.loads(cached.read_text())
    else:
        choice = int8_accuracy.demo_eta(fp32, data / "val")
        cached.write_text(json.dumps(choice, default=float))
    return fp32, float(choice["eta"]), choice


def _decode_both(index: int, texture: cam.Texture, pp) -> dict:  # noqa: ANN001
    """Render image `index`, JPEG-encode it in memory, preprocess it with each decode mode (timed)."""
    from cfvit_deploy.preprocessing import load_and_preprocess

    label, _, _ = cam.held_out(index)
    data = cam.jpeg_bytes(cam.camera_image(index, texture))
    out: dict = {"index": index, "label": label, "jpeg_bytes": len(data)}
    for mode in MODES:
        t0 = perf_counter()
        out[mode] = load_and_preprocess(data, pp, decode=mode)
        out[f"{mode}_s"] = perf_counter() - t0
    return out


def classify(pipe, tensors: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(top-1 class, exited at the coarse stage) per image."""
    result = pipe.run(tensors, eta)
    return result.logits.argmax(1), result.exited.astype(bool)


def decode_chunk(first: int, count: int, pp, texture: cam.Texture, workers: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Images first..first+BATCH-1 (below `count`): both modes' tensors, labels, sizes and decode times."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        items = list(pool.map(lambda i: _decode_both(i, texture, pp), range(first, min(first + BATCH, count))))
    return {
        key: np.stack([it[key] for it in items]) if key in MODES else np.asarray([it[key] for it in items])
        for key in ("index", "label", "jpeg_bytes", *MODES, *(f"{m}_s" for m in MODES))
    }


def decode_all(work: Path, count: int, pp, workers: int = 2) -> list[Path]:  # noqa: ANN001
    """Decode every image with both modes into ``work/decoded`` chunk files (resumable: done chunks are kept)."""
    folder = work / "decoded" / f"{pp.crop_size}-{pp.resize_size}-{pp.interpolation}"
    folder.mkdir(parents=True, exist_ok=True)
    texture: cam.Texture | None = None
    chunks, start = [], perf_counter()
    for first in range(0, count, BATCH):
        path = folder / f"chunk{first:05d}-{min(first + BATCH, count):05d}.npz"
        if not path.is_file():
            texture = texture or cam.Texture(0)
            arrays = decode_chunk(first, count, pp, texture, workers)
            with atomic_write_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
            done = min(first + BATCH, count)
            print(f"decoded {done}/{count} images, {(perf_counter() - start) / done:.2f} s/image", file=sys.stderr)
        chunks.append(path)
    return chunks


def run_study(export_dir: Path, eta: float, chunks: list[Path]) -> list[dict]:
    """One row per image: label, both modes' top-1 and stage, pixel difference, decode times."""
    from runtimes.pipeline import CFViTPipeline

    pipe = CFViTPipeline(export_dir)
    std = np.asarray(pipe.manifest.preprocessing.std, np.float32)[:, None, None]
    rows: list[dict] = []
    for path in chunks:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        preds = {m: classify(pipe, data[m], eta) for m in MODES}
        for j in range(len(data["index"])):
            diff = np.abs(data["exact"][j] - data["fast"][j]) * std * 255.0  # grey levels
            rows.append(
                {
                    "index": int(data["index"][j]),
                    "label": int(data["label"][j]),
                    "jpeg_bytes": int(data["jpeg_bytes"][j]),
                    **{f"{m}_top1": int(preds[m][0][j]) for m in MODES},
                    **{f"{m}_stage": "coarse" if preds[m][1][j] else "fine" for m in MODES},
                    "mean_abs_diff_levels": float(diff.mean()),
                    "max_abs_diff_levels": float(diff.max()),
                    **{f"{m}_decode_ms": 1000 * float(data[f"{m}_s"][j]) for m in MODES},
                }
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Top-1, exit rate per mode; agreement; pixel difference; decode times; the decision rule's verdict."""
    label = np.asarray([r["label"] for r in rows])
    out: dict = {"images": len(rows)}
    for m in MODES:
        out[f"{m}_top1"] = float((np.asarray([r[f"{m}_top1"] for r in rows]) == label).mean())
        out[f"{m}_exit_rate"] = float(np.mean([r[f"{m}_stage"] == "coarse" for r in rows]))
        out[f"{m}_decode_ms_median"] = float(np.median([r[f"{m}_decode_ms"] for r in rows]))
    same = [r["exact_top1"] == r["fast_top1"] and r["exact_stage"] == r["fast_stage"] for r in rows]
    out["agreement"] = float(np.mean(same))
    out["top1_agreement"] = float(np.mean([r["exact_top1"] == r["fast_top1"] for r in rows]))
    out["stage_agreement"] = float(np.mean([r["exact_stage"] == r["fast_stage"] for r in rows]))
    exact_right = label == np.asarray([r["exact_top1"] for r in rows])
    out["agreement_where_exact_right"] = float(np.mean(np.asarray(same)[exact_right])) if exact_right.any() else None
    out["top1_diff_points"] = 100 * (out["fast_top1"] - out["exact_top1"])
    out["exit_rate_diff_points"] = 100 * (out["fast_exit_rate"] - out["exact_exit_rate"])
    mean_diff = np.asarray([r["mean_abs_diff_levels"] for r in rows])
    max_diff = np.asarray([r["max_abs_diff_levels"] for r in rows])
    out["pixel_mean_abs_diff_levels"] = {"mean": float(mean_diff.mean()), "p99": float(np.percentile(mean_diff, 99))}
    out["pixel_max_abs_diff_levels"] = {"median": float(np.median(max_diff)), "max": float(max_diff.max())}
    out["mean_jpeg_mb"] = float(np.mean([r["jpeg_bytes"] for r in rows]) / 2**20)
    out["fast_may_be_default"] = bool(
        out["agreement"] >= MIN_AGREEMENT and abs(out["top1_diff_points"]) <= MAX_TOP1_DIFF_POINTS
    )
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def report(summary: dict, settings: dict) -> str:
    s, busy = summary, settings.get("busy", True)  # results from before --busy existed were busy runs
    verdict = "meets" if s["fast_may_be_default"] else "does NOT meet"
    return "\n".join(
        [
            "# exact vs fast decode: accuracy on camera-size JPEGs",
            "",
            f"_Generated by `python benchmarks/decode_accuracy.py` ({s['images']} images, 4000x3000 quality-92 "
            f"JPEGs, {s['mean_jpeg_mb']:.1f} MB on average; demo model, fp32 export, eta {settings['eta']:g})._",
            "",
            f"| decode | top-1 | exit rate | median decode + preprocess (ms{', BUSY machine' if busy else ''}) |",
            "|---|---:|---:|---:|",
            *[
                f"| {m} | {100 * s[f'{m}_top1']:.2f}% | {100 * s[f'{m}_exit_rate']:.2f}% | "
                f"{s[f'{m}_decode_ms_median']:.0f} |"
                for m in MODES
            ],
            "",
            f"- top-1 and stage agree on **{100 * s['agreement']:.2f}%** of the images (top-1 alone "
            f"{100 * s['top1_agreement']:.2f}%, stage alone {100 * s['stage_agreement']:.2f}%); among the images "
            f"exact classifies right: {_pct(s.get('agreement_where_exact_right'))}",
            f"- top-1 difference fast - exact: **{s['top1_diff_points']:+.2f} points**; exit rate "
            f"{s['exit_rate_diff_points']:+.2f} points",
            f"- pixel difference of the preprocessed tensors (8-bit grey levels): mean absolute "
            f"{s['pixel_mean_abs_diff_levels']['mean']:.2f} (99th percentile over images "
            f"{s['pixel_mean_abs_diff_levels']['p99']:.2f}); largest single value: median over images "
            f"{s['pixel_max_abs_diff_levels']['median']:.1f}, worst {s['pixel_max_abs_diff_levels']['max']:.1f}",
            f"- decision rule (agreement >= {100 * MIN_AGREEMENT:.0f}% and |top-1 difference| <= "
            f"{MAX_TOP1_DIFF_POINTS} points): fast **{verdict}** it",
            "",
            f"Read with care: the demo model classifies the demo's own 256-px held-out images at "
            f"{_pct(settings.get('eta_chosen_by', {}).get('accuracy'))} top-1 (at this eta) but these camera renders "
            f"at {100 * s['exact_top1']:.2f}% even with exact decode (chance: 16.7%): the antialiased resize of a "
            "12-MP photo attenuates the 1-px class patterns (to ~40% contrast for the checker), which the model "
            "never saw in training. Its predictions here are near chance and low-margin, so the agreement is a "
            "pessimistic figure for a model that recognises its inputs (see the agreement among the images exact "
            "gets right).",
            "",
            f"Machine: {settings['machine']} ("
            + ("busy, shared: the decode times are not a speed result; " if busy else "no other work; ")
            + "the accuracy numbers do not depend on load).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfvit-decode-acc")
    ap.add_argument("--count", type=int, default=1020, help="images (>= 1000 for the study)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_accuracy")
    ap.add_argument("--quick", action="store_true", help="the quick demo model: a smoke test, not a result")
    ap.add_argument("--workers", type=int, default=2, help="decode threads")
    ap.add_argument("--busy", action="store_true", help="label the decode times as measured on a busy machine")
    ap.add_argument(
        "--decode-only", action="store_true", help="only decode the images (resumable chunks under --work), no model"
    )
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.decode_only:  # the demo model's evaluation transform (g = 7): crop 224, resize 256
        decode_all(args.work, args.count, PreprocessConfig(crop_size=224, resize_size=256), args.workers)
        return 0
    export_dir, eta, choice = demo_export(args.work, args.quick)
    pp = Manifest.load(export_dir, verify=False).preprocessing
    rows = run_study(export_dir, eta, decode_all(args.work, args.count, pp, args.workers))
    summary = summarize(rows)
    settings = {
        "eta": eta,
        "eta_chosen_by": {k: choice[k] for k in ("budget", "accuracy", "exit_rate") if k in choice},
        "count": args.count,
        "camera_size": list(cam.CAMERA_SIZE),
        "jpeg_quality": cam.JPEG_QUALITY,
        "quick": args.quick,
        "busy": args.busy,
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps({"summary": summary, "settings": settings}, indent=2) + "\n")
    with atomic_write_path(args.out / "images.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = report(summary, settings)
    with atomic_write_path(args.out / "README.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
