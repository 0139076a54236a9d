"""`cfvit demo`: the whole story on built-in data, ending in ``report.md``.

Generate the procedural image set -> train a small CF-ViT -> export (with the plain-ViT baseline)
-> validate the export against PyTorch -> `infer` on the held-out folder with patch overlays ->
`sweep` over η -> a short `bench` -> ``report.md`` with the tables and plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..io import atomic_write_path, check_output


@dataclass(frozen=True)
class DemoResult:
    out: Path
    report: Path
    seconds: dict[str, float]
    summary: dict[str, Any]


def run_demo(out: str | Path = "runs/demo", *, force: bool = False, quick: bool = False,
             say: Callable[[str], None] = print) -> DemoResult:
    """Run every step into `out`; `quick` shrinks data and training to a smoke test (CI)."""
    from exporters import export, validate
    from cfvit_deploy.app.bench import run_bench
    from runtimes.infer import infer

    from ..data.synthetic import SyntheticSpec
    from ..training import DEMO_DATA, DEMO_RECIPE, train_demo
    from .sweep import sweep

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, force)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 1)
        say(f"[demo] {name}: {seconds[name]:.1f} s")
        t = now

    spec, recipe = DEMO_DATA, DEMO_RECIPE
    if quick:  # a smoke test of every step: tiny data, one epoch with informative selection
        spec, recipe = SyntheticSpec(n_train_per_class=8, n_val_per_class=4), replace(recipe, epochs=1, selection_after=0)
    trained = train_demo(out, spec=spec, recipe=recipe, progress=not quick)
    data, checkpoint = out / "data", trained.path
    step("generate the image set and train")
    manifest = export(checkpoint, out / "export", baseline=True, default_eta=0.7)
    step("export")
    report = validate(out / "export", images=data / "val", batch_sizes=(1, 4))
    report.save(out / "validation.json")
    step("validate")
    summary = infer(out / "export", [data / "val"], recursive=True, eta=manifest.default_eta,
                    output=out / "predictions.csv", overlay=out / "overlays")
    step("infer")
    swept = sweep(out / "export", data / "val", "0:1:0.1")
    swept.save(out / "sweep")
    step("sweep")
    bench = run_bench(out / "export", batch_sizes=(1, 32), fine_fractions=(0.24, 0.52, 1.0),
                      duration=0.5 if quick else 2.0, warmup=2, out=out / "bench")
    step("bench")
    info = {
        "classes": trained.class_names,
        "val_coarse_acc": trained.val.coarse_acc,
        "val_fine_acc": trained.val.fine_acc,
        "validation_passed": report.passed,
        "validation_checks": len(report.checks),
        "infer": _plain(summary),
        "gmacs": manifest.gmacs,
    }
    path = _write_report(out, info, report, swept, bench, seconds)
    step("report")
    (out / "summary.json").write_text(json.dumps({**info, "seconds": seconds}, indent=2, default=str) + "\n")
    return DemoResult(out, path, seconds, info)


def _plain(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def _write_report(out: Path, info: dict[str, Any], report: Any, swept: Any, bench: Any,
                  seconds: dict[str, float]) -> Path:
    lines = [
        "# CF-ViT demo report",
        "",
        f"Built-in procedural image set: {len(info['classes'])} classes ({', '.join(info['classes'])}), "
        "easy (large, centred) and hard (small, cluttered) images.",
        "",
        "## Trained model (held-out split, PyTorch)",
        "",
        "| stage | top-1 |",
        "|---|---|",
        f"| coarse (exit everything, η = 0) | {100 * info['val_coarse_acc']:.1f}% |",
        f"| fine (refine everything, η = 1) | {100 * info['val_fine_acc']:.1f}% |",
        "",
        f"GMACs per image: coarse {info['gmacs']['coarse']:.3f}, coarse+fine {info['gmacs']['fine']:.3f}, "
        f"plain ViT baseline {info['gmacs'].get('baseline', float('nan')):.3f}.",
        "",
        "## Export validation (PyTorch vs ONNX Runtime CPU)",
        "",
        f"{'PASSED' if report.passed else 'FAILED'}: {len(report.checks) - len(report.failed)}/{len(report.checks)} "
        "checks (`validation.json`).",
        "",
        "## η trade-off, measured through the orchestrator (`sweep/`)",
        "",
        "| η | top-1 | exit at coarse | GMACs/img | img/s |",
        "|---|---|---|---|---|",
        *[f"| {r.eta:.1f} | {100 * r.accuracy:.1f}% | {100 * r.exit_rate:.0f}% | {r.expected_gmacs:.3f} | "
          f"{r.img_per_s:.0f} |" for r in swept.rows],
        "",
        "![accuracy vs latency and GMACs](sweep/sweep.png)",
        "",
        "## Inference on the held-out folder (`predictions.csv`, `overlays/`)",
        "",
        f"`{json.dumps(info['infer'], default=str)}`",
        "",
        "Overlays show the coarse patches the fine stage refined, for the images that went on.",
        "",
        "## Short benchmark (`bench/`)",
        "",
        "| runtime | model | precision | batch | gate | fine fraction | p50 ms | img/s | speed-up vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.rows:
        if r.status != "ok":
            continue
        lines.append(
            f"| {r.runtime}/{r.provider} | {r.model} | {r.precision} | {r.batch_size} | {r.gate} | "
            f"{_fmt(r.fine_fraction)} | {_fmt(r.p50_ms)} | {_fmt(r.img_per_s)} | {_fmt(r.speedup_vs_baseline)} |"
        )
    lines += ["", *[f"![{p.stem}](bench/{p.name})" for p in sorted((out / "bench").glob("*.png"))], "",
              "## Time per step (s)", "", "| step | s |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in seconds.items()], ""]
    path = out / "report.md"
    with atomic_write_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)
