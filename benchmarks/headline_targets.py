"""The targets of issue 14 (met/missed), built from one run of every part of `run_headline.py`, and their
aggregation over ``--runs N``: the value of a target is the median over runs, with the min-max range.

Pure Python (plus the bench schema): the unit tests build targets from made-up numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from cfvit_deploy.app.bench import BenchResult, BenchRow


@dataclass(frozen=True)
class Target:
    """One measured number and its goal (None: reported only).

    The goal reads ``value >= goal`` by default, ``value <= goal`` with `at_most`, and
    ``|value - center| <= goal`` with `within`. After :func:`aggregate`, `value` is the median over
    runs, `range` the (min, max) of the runs that measured it and `values` every run's value (None
    where a run did not measure it); the verdict is the median's.
    """

    name: str
    value: float | None
    goal: float | None
    detail: str = ""
    within: bool = False  #: goal is a tolerance: |value - center| <= goal
    at_most: bool = False  #: goal is an upper bound: value <= goal
    center: float = 1.0  #: the centre of a `within` tolerance
    range: tuple[float, float] | None = None
    values: tuple[float | None, ...] = ()

    def judge(self, value: float | None) -> bool | None:
        """Whether `value` meets the goal (None: nothing to judge)."""
        if value is None or self.goal is None:
            return None
        if self.within:
            return abs(value - self.center) <= self.goal
        return value <= self.goal if self.at_most else value >= self.goal

    @property
    def met(self) -> bool | None:
        return self.judge(self.value)

    @property
    def runs(self) -> int:
        return len(self.values) or 1

    @property
    def runs_met(self) -> int:
        """How many runs met the goal on their own."""
        return sum(self.judge(v) is True for v in (self.values or (self.value,)))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "range": list(self.range) if self.range else None,
            "runs": self.runs,
            "values": list(self.values or (self.value,)),
            "goal": self.goal,
            "rule": self.rule(),
            "met": self.met,
            "runs_met": self.runs_met,
            "detail": self.detail,
        }

    def rule(self) -> str:
        if self.goal is None:
            return "-"
        if self.within:
            return f"{self.center:g} ± {self.goal:g}"
        return f"<= {self.goal:g}" if self.at_most else f">= {self.goal:g}"

    def verdict(self) -> str:
        if self.goal is None:
            return "reported" if self.value is not None else "not measured"
        text = {True: "met", False: "**MISSED**", None: "not measured"}[self.met]
        measured = sum(v is not None for v in self.values)
        if self.met is not None and measured > 1 and 0 < self.runs_met < measured:
            text += f" ({self.runs_met}/{measured} runs met)"
        return text

    def line(self) -> str:
        """One row of the README's targets table: name, median, range, goal, verdict, note."""
        value = "n/a" if self.value is None else f"{self.value:.2f}"
        spread = "-" if self.range is None else f"{self.range[0]:.2f}–{self.range[1]:.2f}"
        return f"| {self.name} | {value} | {spread} | {self.rule()} | {self.verdict()} | {self.detail} |"


def aggregate(runs: list[list[Target]]) -> list[Target]:
    """One target per name (in first-seen order) over `runs`: median value, (min, max) range, every run's value.

    The detail (note) is the one of the run closest to the median.
    """
    names: dict[str, Target] = {}
    for goals in runs:
        for t in goals:
            names.setdefault(t.name, t)
    out = []
    for name, first in names.items():
        per_run = [next((t for t in goals if t.name == name), None) for goals in runs]
        values = tuple(None if t is None else t.value for t in per_run)
        measured = sorted(v for v in values if v is not None)
        if not measured:
            out.append(replace(first, value=None, range=None, values=values))
            continue
        median = float(statistics.median(measured))
        nearest = min(
            (t for t in per_run if t is not None and t.value is not None), key=lambda t: abs(t.value - median)
        )
        out.append(replace(nearest, value=median, range=(measured[0], measured[-1]), values=values))
    return out


def row_of(
    result: BenchResult,
    runtime: str,
    provider: str,
    precision: str,
    batch: int,
    model: str,
    fraction: float | None,
    decode: str | None = None,
) -> BenchRow | None:
    """The row of one headline cell (measured or not), or None when it was not requested. `decode` None:
    the model-only row (preallocated tensors); "exact" | "fast": the end-to-end row with that decode."""
    for r in result.rows:
        if (r.runtime, r.provider, r.precision, r.batch_size, r.model, r.decode) == (
            runtime,
            provider,
            precision,
            batch,
            model,
            decode,
        ) and (model == "baseline" or r.target_fine_fraction == fraction):
            return r
    return None


#: The int8 forms bench measures (``--precisions`` names), each runtime's headline int8 row is its fastest.
INT8_PRECISIONS = ("int8", "int8-static")
#: The cell that decides which int8 form is a runtime's fastest: batch 32 throughput at f = 0.24.
INT8_DECIDER = (32, "cfvit", 0.24)


def best_int8(result: BenchResult, runtime: str, provider: str) -> str:
    """The ``--precisions`` name of `runtime`'s fastest int8 form (batch 32, f = 0.24, model only); "int8"
    (dynamic) when none was measured."""
    measured = [
        (r.img_per_s, p)
        for p in INT8_PRECISIONS
        if (r := ok(row_of(result, runtime, provider, p, *INT8_DECIDER))) is not None
    ]
    return max(measured)[1] if measured else "int8"


def ok(row: BenchRow | None) -> BenchRow | None:
    return row if row is not None and row.status == "ok" else None


def _ratio(a: BenchRow | None, b: BenchRow | None) -> float | None:
    a, b = ok(a), ok(b)
    return None if a is None or b is None else a.img_per_s / b.img_per_s


def targets(result: BenchResult, infer_runs: list[dict]) -> list[Target]:
    """Issue 14's ratios, each from rows of this run, and `cfvit infer` vs the bench row of the same batch."""

    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(result.machine.get("cpu_flags") or []))

    def ort(precision: str, b: int, model: str = "cfvit", f: float | None = None) -> BenchRow | None:
        return row_of(result, "onnxruntime", "cpu", precision, b, model, f)

    base1, base32 = ort("fp32", 1, "baseline"), ort("fp32", 32, "baseline")
    out = [
        Target("fp32 pipeline / DeiT-S fp32, batch 1 latency, f=0.24", _ratio(ort("fp32", 1, f=0.24), base1), 2.4),
        Target("fp32 pipeline / DeiT-S fp32, batch 32 img/s, f=0.24", _ratio(ort("fp32", 32, f=0.24), base32), 2.6),
        Target("fp32 pipeline / DeiT-S fp32, batch 32 img/s, f=0.52", _ratio(ort("fp32", 32, f=0.52), base32), 1.8),
        Target(
            "int8 pipeline / fp32 pipeline, batch 32 img/s, f=0.24",
            _ratio(ort("int8", 32, f=0.24), ort("fp32", 32, f=0.24)),
            2.5,
        ),
    ]
    for run in infer_runs:
        bench_row = ok(ort("fp32", run["batch_size"], f=1.0))
        value = None if bench_row is None or not run.get("img_per_s") else run["img_per_s"] / bench_row.img_per_s
        detail = run.get("error") or (
            f"infer {run['img_per_s']:.1f} img/s on {run['images']} files, bench {bench_row.img_per_s:.1f} img/s"
            if value is not None
            else ""
        )
        out.append(
            Target(
                f"`cfvit infer` / bench row, fp32 eta=1, batch {run['batch_size']} (img/s)",
                value,
                0.10,
                detail,
                within=True,
            )
        )
    for b, f in ((1, 0.24), (32, 0.24)):
        ov, cpu = row_of(result, "openvino", "openvino", "fp32", b, "cfvit", f), ort("fp32", b, f=f)
        out.append(Target(f"OpenVINO / ONNX Runtime, fp32 pipeline, batch {b}, f={f:g}", _ratio(ov, cpu), None))
    # issue 25.5: each runtime's fastest int8 form against its fp32 (goal for OpenVINO on a VNNI CPU: >= 2x)
    for runtime, provider, name in (("onnxruntime", "cpu", "ONNX Runtime"), ("openvino", "openvino", "OpenVINO")):
        form = best_int8(result, runtime, provider)
        int8 = row_of(result, runtime, provider, form, 32, "cfvit", 0.24)
        fp32 = row_of(result, runtime, provider, "fp32", 32, "cfvit", 0.24)
        goal = 2.0 if runtime == "openvino" and vnni else None
        out.append(Target(f"{name} fastest int8 ({form}) / its fp32, batch 32 img/s, f=0.24", _ratio(int8, fp32), goal))
    return out + end_to_end_targets(result)


#: Issue 25.3: end-to-end throughput on camera JPEGs over model-only throughput, batch 32, eta = 1 (f = 1):
#: precision -> goal with fast decode (exact is reported beside it).
END_TO_END_GOALS = {"fp32": 0.80, "int8": 0.55}


def end_to_end_targets(result: BenchResult) -> list[Target]:
    """End-to-end / model-only images/s of the same pipeline, batch 32 (ONNX Runtime CPU), per decode mode:
    at f = 1 (every image through both stages) against issue 25's goals for fast decode, and at f = 0.24."""
    out = []
    for precision, goal in END_TO_END_GOALS.items():
        for f in (1.0, 0.24):
            model = row_of(result, "onnxruntime", "cpu", precision, 32, "cfvit", f)
            for decode in ("fast", "exact"):
                e2e = row_of(result, "onnxruntime", "cpu", precision, 32, "cfvit", f, decode)
                if e2e is None:
                    continue
                value = _ratio(e2e, model)
                detail = "" if value is None else f"{e2e.img_per_s:.1f} vs {model.img_per_s:.1f} img/s"  # type: ignore[union-attr]
                name = f"end-to-end / model-only, {precision} batch 32 f={f:g}, decode {decode} (camera JPEGs)"
                out.append(Target(name, value, goal if decode == "fast" and f == 1.0 else None, detail))
    return out


def attention_targets(ab: dict) -> list[Target]:
    """The fused-vs-plain A/B (``attention_ab.run_ab``): batch-1 pipeline latency >= 15% lower fused."""
    rows = {(r["attention"], r["graph"], r["batch"], r["fine_fraction"]): r for r in ab["rows"]}
    fused, plain = rows.get(("fused", "pipeline", 1, 0.24)), rows.get(("plain", "pipeline", 1, 0.24))
    detail = (
        f"{fused['median_ms_per_batch']:.1f} ms fused vs {plain['median_ms_per_batch']:.1f} ms plain, "
        f"median of {ab['rounds']} ABBA round(s)"
        if fused and plain
        else ""
    )
    return [
        Target(
            "fused / plain attention, fp32 pipeline batch 1 latency, f=0.24: % lower fused",
            ab["ratios"].get("fused_vs_plain_b1_latency_reduction_pct"),
            15.0,
            detail,
        )
    ]


def int8_accuracy_targets(rows: list[dict]) -> list[Target]:
    """``int8_accuracy.accuracy_part`` (the demo's trained model): per int8 variant, top-1 drop <= 1 point and
    exit-rate change within ±2 points of fp32, at the demo's default η (its sweep's choice on the fp32 export)."""
    base = next(r for r in rows if r["variant"] == "fp32")
    out = []
    for r in rows:
        if r["variant"] == "fp32":
            continue
        where = f"{r['images']} held-out images, eta {r['eta']:g} (the demo's sweep choice)"
        out += [
            Target(
                f"{r['variant']} top-1 drop vs fp32, demo model (points)",
                r["top1_drop_points"],
                1.0,
                f"top-1 {100 * r['top1']:.2f}% vs {100 * base['top1']:.2f}% fp32, {where}",
                at_most=True,
            ),
            Target(
                f"{r['variant']} exit-rate change vs fp32, demo model (points)",
                r["exit_rate_change_points"],
                2.0,
                f"exit rate {100 * r['exit_rate']:.2f}% vs {100 * base['exit_rate']:.2f}% fp32, {where}",
                within=True,
                center=0.0,
            ),
        ]
    return out


def int8_speed_targets(rows: list[dict]) -> list[Target]:
    """``int8_accuracy.speed_part`` (DeiT-S size): int8 pipeline >= 2.5x fp32, batch 32, f=0.24."""
    base = next(r for r in rows if r["variant"] == "fp32")
    return [
        Target(
            f"{r['variant']} / fp32 pipeline, batch 32 img/s, f={r['fine_fraction']:g} (interleaved rounds)",
            r["speed_vs_fp32"],
            2.5,
            f"{r['img_per_s']:.1f} vs {base['img_per_s']:.1f} img/s, median of {len(r['rounds_img_per_s'])} round(s)",
        )
        for r in rows
        if r["variant"] != "fp32"
    ]
