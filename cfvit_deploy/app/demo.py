"""`cfvit demo`: the whole story on built-in data, ending in ``report.md``.

Generate the procedural image set -> train a small CF-ViT -> export (with the plain-ViT baseline)
-> `sweep` over η on the held-out folder, choosing the cheapest η within :data:`DEMO_MAX_DROP` top-1
points of η = 1 and writing it as the export's default η -> validate the export against PyTorch ->
`infer` on the held-out folder at that η, with patch overlays -> a short `bench` -> ``report.md``
with the tables and plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CFViTError
from ..io import atomic_write_path, check_output
from ..progress import ProgressHook

#: the demo's accuracy budget: the cheapest η whose top-1 is at most this many points below η = 1
DEMO_MAX_DROP = 1.0
#: the sweep's and bench's timings wait for, and re-measure past, other processes above this CPU %
DEMO_QUIET_BELOW = 25.0


class DemoStepError(CFViTError):
    """A demo step ran but produced nothing (e.g. no benchmark cell measured): the demo fails."""


@dataclass(frozen=True)
class DemoResult:
    out: Path
    report: Path
    seconds: dict[str, float]
    summary: dict[str, Any]


def run_demo(
    out: str | Path = "runs/demo",
    *,
    force: bool = False,
    quick: bool = False,
    say: Callable[[str], None] = print,
    progress: ProgressHook | None = None,
) -> DemoResult:
    """Run every step into `out`; `quick` shrinks data and training to a smoke test (CI).

    `out` is resolved against the current directory first (the benchmark's cell processes run
    elsewhere). A step that produces nothing raises :class:`DemoStepError`. `progress` is handed to
    the steps (training, sweep, validation, bench); the CLI passes bars on stderr only on a terminal.
    """
    from exporters import export, validate
    from runtimes.infer import infer

    from .bench import run_bench
    from .sweep import sweep, write_default_eta

    out = _fresh_folder(out, force)
    step = _StepTimer(say)
    trained = _train(out, quick, progress)
    data, checkpoint = out / "data", trained.path
    step("generate the image set and train")
    manifest = export(checkpoint, out / "export", baseline=True, default_eta=0.7)
    step("export")
    timing = {"repeats": 1} if quick else {"repeats": 2, "quiet_below": DEMO_QUIET_BELOW}  # load costs time, not truth
    swept = sweep(out / "export", data / "val", "0:1:0.1", max_drop=DEMO_MAX_DROP, progress=progress, **timing)
    _produced("sweep", bool(swept.rows) and swept.choice is not None, "no eta was measured")
    swept.save(out / "sweep")
    # the chosen η becomes the export's default (graphs untouched), so validate and infer below use it
    manifest = write_default_eta(out / "export", swept.choice["eta"], chosen_by=swept.choice)
    step("sweep and choose eta")
    report = validate(out / "export", images=data / "val", batch_sizes=(1, 4), progress=progress)
    _produced("validate", bool(report.checks), "no check was run")
    report.save(out / "validation.json")
    step("validate")
    summary = infer(
        out / "export",
        [data / "val"],
        recursive=True,
        eta=manifest.default_eta,
        output=out / "predictions.csv",
        overlay=out / "overlays",
        progress=None,
    )  # False drew a bar on stdout
    _produced("infer", summary.images > 0, f"no image of {data / 'val'} was classified ({summary.errors} errors)")
    step("infer")
    bench = run_bench(
        out / "export",
        batch_sizes=(1, 32),
        fine_fractions=(0.24, 0.52, 1.0),
        duration=0.5 if quick else 1.0,  # x 2 repeats: the 2 s per cell of one pass, split
        warmup=2,
        **timing,
        out=out / "bench",
        progress=progress,
    )
    check_bench(bench.rows)
    step("bench")
    info = {
        "quick": quick,
        "classes": trained.class_names,
        "val_coarse_acc": trained.val.coarse_acc,
        "val_fine_acc": trained.val.fine_acc,
        "validation_passed": report.passed,
        "validation_checks": len(report.checks),
        "infer": _plain(summary),
        "infer_eta": manifest.default_eta,
        "gmacs": manifest.gmacs,
        "eta_choice": swept.choice,
        "machine": _machine_lines(trained, swept, bench),
    }
    if not quick and (warning := below_expected(trained.val.coarse_acc, trained.val.fine_acc)):
        info["warning"] = warning
    path = write_report(out, info, report, swept, bench, step.seconds)
    step("report")
    with atomic_write_path(out / "summary.json") as tmp:  # a full disk: one line naming it, no half-written file
        tmp.write_text(json.dumps({**info, "seconds": step.seconds}, indent=2, default=str) + "\n")
    return DemoResult(out, path, step.seconds, info)


def below_expected(coarse_acc: float, fine_acc: float) -> str | None:
    """One line saying how the trained demo model misses the recipe's expected range, with what to
    try; None when it is within it."""
    from ..training_recipe import DEMO_EXPECTED_FINE, DEMO_EXPECTED_GAP, DEMO_TRY

    if fine_acc >= DEMO_EXPECTED_FINE and fine_acc - coarse_acc >= DEMO_EXPECTED_GAP:
        return None
    return (
        f"the trained model is below the demo recipe's expected range: fine top-1 {100 * fine_acc:.1f}% "
        f"(expected >= {100 * DEMO_EXPECTED_FINE:.0f}%), {100 * (fine_acc - coarse_acc):.1f} points above coarse "
        f"(expected >= {100 * DEMO_EXPECTED_GAP:.0f}); {DEMO_TRY}"
    )


def summary_lines(result: DemoResult) -> list[str]:
    """What `cfvit demo` prints on stdout when it ends: the accuracies, the chosen η with its top-1, exit
    rate and latency, a warning when the model is below the recipe's range, and where everything is."""
    s, out = result.summary, result.out
    lines = [
        f"coarse top-1 {100 * s['val_coarse_acc']:.1f}%, fine top-1 {100 * s['val_fine_acc']:.1f}%, "
        f"export validation {'PASSED' if s['validation_passed'] else 'FAILED'}; "
        f"total {sum(result.seconds.values()):.0f} s"
    ]
    if choice := s.get("eta_choice"):
        lines.append(
            f"chosen eta {choice['eta']:g} (top-1 at most {choice['budget']['max_drop']:g} point below eta = 1, "
            f"now the export's default): top-1 {100 * choice['accuracy']:.1f}%, exit at coarse "
            f"{100 * choice['exit_rate']:.0f}%, {choice['ms_per_image']:.2f} ms/image "
            f"(batch {choice['batch_size']})"
        )
    lines += s.get("machine", [])
    if s.get("warning"):
        lines.append(f"warning: {s['warning']}")
    lines += [
        f"report: {result.report}",
        f"export: {out / 'export'}",
        f"predictions: {out / 'predictions.csv'} (overlays in {out / 'overlays'})",
        f"sweep: {out / 'sweep'}",
        f"bench: {out / 'bench'}",
    ]
    return lines


def _machine_lines(trained: Any, swept: Any, bench: Any) -> list[str]:
    """What the numbers were measured on: the CPU, the threads of training and inference, and how busy
    the machine was during the sweep and the bench (timings under load are inflated)."""
    from .bench.results import LOADED_BACKGROUND_PCT

    machine, settings = bench.machine, bench.settings
    threads = [h.get("threads") for h in trained.history if h.get("threads")]
    sweep_bg = [r.background_cpu_pct for r in swept.rows if r.background_cpu_pct is not None]
    bench_bg = [r.background_cpu_pct for r in bench.rows if r.status == "ok" and r.background_cpu_pct is not None]

    def load(values: list[float]) -> str:
        if not values:
            return "not measured"
        busy = sum(v >= LOADED_BACKGROUND_PCT for v in values)
        return (
            f"{min(values):.0f}-{max(values):.0f}% ({busy} of {len(values)} timings at >= {LOADED_BACKGROUND_PCT:.0f}%)"
        )

    return [
        f"CPU: {machine.get('cpu_model', 'unknown')} ({machine.get('logical_cores', '?')} logical cores)",
        f"threads: training {threads[-1] if threads else 'unknown'} (torch), "
        f"inference {settings.get('threads', 'default')} (ONNX Runtime intra-op)",
        f"background CPU (other processes, % of all cores): sweep {load(sweep_bg)}, bench {load(bench_bg)}",
    ]


def _fresh_folder(out: str | Path, force: bool) -> Path:
    """`out` resolved and empty: an existing folder is replaced only with `force`."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, force)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


class _StepTimer:
    """``step(name)`` records (and says) the seconds since the previous step ended."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 1)
        self.say(f"[demo] {name}: {self.seconds[name]:.1f} s")
        self.t = now


def _train(out: Path, quick: bool, progress: ProgressHook | None) -> Any:
    """Generate the image set under ``out/data`` and train the demo model (tiny data and one epoch if `quick`)."""
    from ..data.synthetic import SyntheticSpec
    from ..training import DEMO_DATA, DEMO_RECIPE, train_demo

    spec, recipe = DEMO_DATA, DEMO_RECIPE
    if quick:  # a smoke test of every step: tiny data, one epoch with informative selection
        spec, recipe = (
            SyntheticSpec(n_train_per_class=8, n_val_per_class=4),
            replace(recipe, epochs=1, selection_after=0),
        )
    trained = train_demo(out, spec=spec, recipe=recipe, progress=progress)
    _produced("train", bool(trained.history) and trained.path.is_file(), "no epoch was trained")
    return trained


def _produced(name: str, ok: bool, why: str) -> None:
    if not ok:
        raise DemoStepError(f"demo: the {name} step produced nothing: {why}")


def check_bench(rows: list[Any]) -> None:
    """The short benchmark must have measured the gated model and the baseline (else its table is empty)."""
    measured = {r.model for r in rows if r.status == "ok"}
    missing = [m for m in ("cfvit", "baseline") if m not in measured]
    if missing:
        reasons = sorted({r.reason for r in rows if r.status != "ok" and r.reason}) or ["no cell was planned"]
        _produced("bench", False, f"no {' or '.join(missing)} cell was measured ({reasons[0]})")


def _plain(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def write_report(
    out: Path, info: dict[str, Any], report: Any, swept: Any, bench: Any, seconds: dict[str, float]
) -> Path:
    lines = [
        "# CF-ViT demo report",
        "",
        f"Built-in procedural image set: {len(info['classes'])} classes ({', '.join(info['classes'])}), "
        "easy (large, centred) and hard (small, cluttered) images.",
        "",
        "## Trained model (held-out split, PyTorch)",
        "",
        *([f"**Warning:** {info['warning']}", ""] if info.get("warning") else []),
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
        *_eta_choice_section(info["eta_choice"]),
        "",
        "| η | top-1 | exit at coarse | GMACs/img | img/s |",
        "|---|---|---|---|---|",
        *[
            f"| {r.eta:.1f} | {100 * r.accuracy:.1f}% | {100 * r.exit_rate:.0f}% | {r.expected_gmacs:.3f} | "
            f"{r.img_per_s:.0f} |"
            for r in swept.rows
        ],
        "",
        "![accuracy vs latency and GMACs](sweep/sweep.png)",
        "",
        "## Inference on the held-out folder (`predictions.csv`, `overlays/`)",
        "",
        f"At the export's default η = {info['infer_eta']:g}.",
        "",
        *infer_table(info["infer"]),
        "",
        "Overlays show the coarse patches the fine stage refined, for the images that went on.",
        "",
        "## Short benchmark (`bench/`)",
        "",
        *bench_table(bench.rows),
    ]
    lines += ["", "## Measured on", "", *[f"- {line}" for line in info.get("machine", [])]]
    lines += [
        "",
        *[f"![{p.stem}](bench/{p.name})" for p in sorted((out / "bench").glob("*.png"))],
        "",
        "## Time per step (s)",
        "",
        "| step | s |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in seconds.items()],
        "",
    ]
    path = out / "report.md"
    with atomic_write_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def bench_table(rows: list[Any]) -> list[str]:
    """The measured benchmark cells as a Markdown table; a cell not to be trusted says why."""
    from .bench.results import caveats

    marked = caveats(rows)
    return [
        "| runtime | model | precision | batch | gate | fine fraction | p50 ms | img/s | speed-up vs baseline | caveat |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r.runtime}/{r.provider} | {r.model} | {r.precision} | {r.batch_size} | {r.gate} | "
            f"{_fmt(r.fine_fraction)} | {_fmt(r.p50_ms)} | {_fmt(r.img_per_s)} | {_fmt(r.speedup_vs_baseline)} | "
            f"{marked.get(i, '')} |"
            for i, r in enumerate(rows)
            if r.status == "ok"
        ],
    ]


def _eta_choice_section(choice: dict[str, Any]) -> list[str]:
    """The η chosen for the demo's budget, with what the sweep measured at it."""
    budget = choice["budget"]
    return [
        f"**Chosen η = {choice['eta']:g}**: the cheapest η whose top-1 is at most {budget['max_drop']:g} point(s) "
        f"below η = 1 ({100 * budget['reference_accuracy']:.1f}%). Measured at it: top-1 "
        f"{100 * choice['accuracy']:.1f}%, exit at coarse {100 * choice['exit_rate']:.0f}%, "
        f"{choice['ms_per_image']:.2f} ms per image ({choice['img_per_s']:.0f} img/s, {choice['provider']}, "
        f"batch {choice['batch_size']}), {choice['expected_gmacs']:.3f} GMACs per image. It is written as the "
        "export's default η (`manifest.json`); validation and `predictions.csv` use it.",
    ]


def infer_table(s: dict[str, Any]) -> list[str]:
    """The `cfvit infer` summary as a two-column table (counts and rates, not a raw dict)."""
    s = {key: s.get(key) or 0 for key in ("inputs", "exited", "fine", "errors", "overlays", "seconds")}
    images = s["exited"] + s["fine"]
    rate = s["exited"] / images if images else 0.0
    speed = images / s["seconds"] if s["seconds"] else 0.0
    return [
        "| | |",
        "|---|---|",
        f"| input files | {s['inputs']} |",
        f"| classified | {images} |",
        f"| answered at the coarse stage | {s['exited']} ({100 * rate:.0f}%) |",
        f"| went on to the fine stage | {s['fine']} |",
        f"| unreadable files | {s['errors']} |",
        f"| overlays written | {s['overlays']} |",
        f"| throughput | {speed:.0f} img/s |",
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)
