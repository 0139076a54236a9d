"""int8 accuracy and speed: fp32 vs dynamic int8 vs static (calibrated QDQ) int8, through the pipeline.

Part 1, accuracy (the demo's trained model): trains the demo recipe once (``train_demo``; about 3
minutes, cached under ``--work``), exports fp32, builds the dynamic and the static int8 variants
(static calibrated on up to 128 images of the demo's *training* split), and runs the pipeline at the
demo's default η (the cheapest η within 1 top-1 point of η = 1 on the held-out split, chosen on the fp32
export by ``sweep`` exactly as ``cfvit demo`` chooses it) on the held-out split: top-1, exit rate and batch-32 images/s for each. Targets:
top-1 drop <= 1 point and exit-rate change <= 2 points vs fp32. On this micro model int8 may well be
slower than fp32 (its GEMMs are too small to pay for quantizing activations); the table says so.

Part 2, speed (``--deit-s``): a seed-0 DeiT-S-size export (embed 384, depth 12, heads 6, g = 7) and its
dynamic and static int8 variants (static calibrated on the demo's training images), pipeline
throughput at batch 32, fine fraction 0.24 (synthetic gate: η = the confidence quantile that sends
24% of the pool to the fine stage), interleaved over ``--rounds`` rounds, median. Target: int8 >= 2.5x
fp32.

    python benchmarks/int8_accuracy.py [--work runs/int8] [--deit-s] [--rounds 3] [--out int8.json]

``accuracy_part`` and ``speed_part`` are the library twins; ``benchmarks/run_headline.py`` runs both and
judges their targets.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("fp32", "int8-dynamic", "int8-static")


def build_variants(fp32: Path, calibration: Path) -> dict[str, Path]:
    """fp32 export -> {variant: folder}; variants are rebuilt only when missing."""
    from exporters.variants import make_variant

    dirs = {
        "fp32": fp32,
        "int8-dynamic": fp32.with_name(fp32.name + "-int8-dynamic"),
        "int8-static": fp32.with_name(fp32.name + "-int8-static"),
    }
    if not (dirs["int8-dynamic"] / "manifest.json").is_file():
        make_variant(fp32, dirs["int8-dynamic"], "int8", force=True)
    if not (dirs["int8-static"] / "manifest.json").is_file():
        make_variant(fp32, dirs["int8-static"], "int8", calibration=calibration, force=True)
    return dirs


def labelled(folder: Path, manifest) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Held-out images (class sub-folders named as the export's classes) and their label indices."""
    from cfvit_deploy.data.reader import list_images, read_images

    index = {name: i for i, name in enumerate(manifest.labels())}
    read = read_images(list_images(folder), manifest.preprocessing)
    return read.images, np.asarray([index[p.parent.name] for p in read.paths])


def throughput(pipe, pool: np.ndarray, eta: float, batch: int = 32, seconds: float = 3.0) -> float:  # noqa: ANN001
    """Images per second of ``pipe.run`` over whole passes of `pool` in batches of `batch`."""
    batches = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)] or [pool]
    pipe.run(batches[0], eta)
    n, start = 0, perf_counter()
    while perf_counter() - start < seconds or n == 0:
        for b in batches:
            pipe.run(b, eta)
            n += len(b)
    return n / (perf_counter() - start)


def demo_data(work: Path, quick: bool = False) -> Path:
    """The demo's image set under ``work/demo[-quick]/data`` (made once; `quick`: 8 train / 4 val per class)."""
    from cfvit_deploy.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from cfvit_deploy.training import DEMO_DATA

    spec = SyntheticSpec(n_train_per_class=8, n_val_per_class=4) if quick else DEMO_DATA
    return make_synthetic_dataset(work / ("demo-quick" if quick else "demo") / "data", **asdict(spec))


def demo_model(work: Path, quick: bool = False) -> tuple[Path, Path]:
    """The demo's trained checkpoint and its data (trained once; `quick`: tiny data, one epoch, as ``demo --quick``)."""
    from cfvit_deploy.checkpoints import checkpoint_metadata
    from cfvit_deploy.training import DEMO_RECIPE, train

    data = demo_data(work, quick)
    ckpt = data.parent / "cfvit-demo.pth"
    recipe = replace(DEMO_RECIPE, epochs=1, selection_after=0) if quick else DEMO_RECIPE
    if not ckpt.is_file() or checkpoint_metadata(ckpt).get("recipe") != recipe.to_dict():
        # missing, or trained with another recipe: (re)train, and drop the exports made from the old model
        for stale in work.glob("demo-*export*"):
            shutil.rmtree(stale)
        train(data, ckpt, recipe, force=True)
    return ckpt, data


def demo_eta(fp32: Path, val: Path) -> dict:
    """The η `cfvit demo` makes the export's default: the cheapest η whose held-out top-1 is at most
    DEMO_MAX_DROP points below η = 1 (``sweep(..., max_drop=...)`` on the fp32 export, 0:1:0.1)."""
    from cfvit_deploy.app.demo import DEMO_MAX_DROP
    from cfvit_deploy.app.sweep import sweep

    choice = sweep(fp32, val, "0:1:0.1", max_drop=DEMO_MAX_DROP).choice
    assert choice is not None  # a budget always yields a choice (η = 1 meets it)
    return choice


def accuracy_part(work: Path, quick: bool = False, seconds: float = 3.0) -> list[dict]:
    """fp32 / dynamic / static int8 of the demo model at the demo's default η (:func:`demo_eta`, chosen on
    the fp32 export) on the held-out split: top-1, exit rate and batch-32 images/s (`seconds` each), with
    the changes vs fp32."""
    from exporters import export
    from runtimes.pipeline import CFViTPipeline

    ckpt, data = demo_model(work, quick)
    fp32 = work / ("demo-quick-export" if quick else "demo-export")
    if not (fp32 / "manifest.json").is_file():
        export(ckpt, fp32, force=True)
    choice = demo_eta(fp32, data / "val")
    eta = float(choice["eta"])
    dirs = build_variants(fp32, data / "train")
    rows = []
    for name, d in dirs.items():
        pipe = CFViTPipeline(d)
        images, labels = labelled(data / "val", pipe.manifest)
        res = [pipe.run(images[i : i + 32], eta) for i in range(0, len(images), 32)]
        pred = np.concatenate([r.logits.argmax(1) for r in res])
        exited = np.concatenate([r.exited for r in res])
        rows.append(
            {
                "variant": name,
                "eta": eta,
                "eta_chosen_by": {k: choice[k] for k in ("budget", "accuracy", "exit_rate") if k in choice},
                "images": int(len(labels)),
                "top1": float((pred == labels).mean()),
                "exit_rate": float(exited.mean()),
                "img_per_s_b32": throughput(pipe, images, eta, seconds=seconds),
            }
        )
    base = rows[0]
    for r in rows:
        r["top1_drop_points"] = 100 * (base["top1"] - r["top1"])
        r["exit_rate_change_points"] = 100 * (r["exit_rate"] - base["exit_rate"])
        r["speed_vs_fp32"] = r["img_per_s_b32"] / base["img_per_s_b32"]
        r["slower_than_fp32"] = r["speed_vs_fp32"] < 1.0
    return rows


def _eta_for_fraction(confidence: np.ndarray, fraction: float) -> float:
    c = np.sort(confidence.astype(np.float32))
    m = int(math.floor(fraction * c.size + 0.5))
    return 0.0 if m <= 0 else 1.0 if m >= c.size else float(c[m])


def speed_part(
    work: Path,
    rounds: int,
    fraction: float = 0.24,
    size: str = "small",
    seconds: float = 3.0,
    calibration: Path | None = None,
) -> list[dict]:
    """fp32 / dynamic / static int8 pipeline images/s of a seed-0 DeiT export of `size` at batch 32 and
    `fraction` to the fine stage: `rounds` interleaved rounds of `seconds` per variant, median.
    Static int8 is calibrated on `calibration` (default: the demo's training images, made if missing)."""
    import torch

    from cfvit_deploy import ModelConfig
    from cfvit_deploy.model import CFViT
    from exporters import export
    from runtimes.pipeline import CFViTPipeline

    fp32 = work / ("deit-s" if size == "small" else f"deit-{size}")
    if not (fp32 / "manifest.json").is_file():
        torch.manual_seed(0)
        export(CFViT(ModelConfig.named("deit", size, coarse_grid=7)).eval(), fp32, force=True)
    dirs = build_variants(fp32, calibration or demo_data(work) / "train")
    pipes = {name: CFViTPipeline(d) for name, d in dirs.items()}
    s = pipes["fp32"].image_size
    pool = np.random.default_rng(0).standard_normal((64, 3, s, s)).astype(np.float32)
    etas = {
        n: _eta_for_fraction(np.concatenate([p.run(pool[i : i + 32], 0.0).confidence for i in (0, 32)]), fraction)
        for n, p in pipes.items()
    }
    seen: dict[str, list[float]] = {n: [] for n in pipes}
    for r in range(rounds):
        for n in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            seen[n].append(throughput(pipes[n], pool, etas[n], seconds=seconds))
    base = float(np.median(seen["fp32"]))
    return [
        {
            "variant": n,
            "batch": 32,
            "fine_fraction": fraction,
            "img_per_s": float(np.median(v)),
            "rounds_img_per_s": v,
            "speed_vs_fp32": float(np.median(v)) / base,
        }
        for n, v in seen.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "int8")
    p.add_argument("--deit-s", action="store_true", help="also measure the DeiT-S-size export (part 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"accuracy": accuracy_part(args.work)}
    print("variant        top-1   drop(pt)  exit rate  change(pt)  img/s b32  vs fp32")
    for r in result["accuracy"]:
        print(
            f"{r['variant']:<13} {100 * r['top1']:6.2f}  {r['top1_drop_points']:8.2f}  {100 * r['exit_rate']:8.2f}  "
            f"{r['exit_rate_change_points']:10.2f}  {r['img_per_s_b32']:9.1f}  {r['speed_vs_fp32']:6.2f}x"
            f"{'  (int8 slower than fp32 on this model)' if r['slower_than_fp32'] else ''}"
        )
    if args.deit_s:
        result["deit_s_speed"] = speed_part(args.work, args.rounds)
        for r in result["deit_s_speed"]:
            print(f"DeiT-S {r['variant']:<13} b32 f=0.24: {r['img_per_s']:7.1f} img/s  {r['speed_vs_fp32']:.2f}x fp32")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
