"""`make mutation`: mutation testing (mutmut) of the code where a silent bug costs users most, and its report.

The scope is configured by module path and function name (stable under edits), never by line numbers:
mutmut (setup.cfg ``[mutmut]``) generates the mutants of the files listed there; this script runs only
the mutants of the functions in SCOPE, each against the fast tests that cover it (mutmut's per-function
test selection), then writes the score and the survivors to benchmarks/results/mutation/report.md.
A survivor that is kept needs a reason in benchmarks/results/mutation/accepted.json, keyed by its stable
description ``module.function: -old line / +new line`` (printed in the report).

    python tools/mutation.py run       # mutmut run on the scope (36 min measured on 2 AVX2 cores)
    python tools/mutation.py report    # score + survivors from the last run (seconds)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
ACCEPTED = RESULTS / "accepted.json"
MUTMUT = [sys.executable, "-m", "mutmut"]

#: module -> mutmut function-name globs in scope ("x_<function>" or "xǁ<Class>ǁ<method>")
SCOPE: dict[str, list[str]] = {
    "runtimes.gate": ["x_softmax", "x_max_softmax", "x_exits", "x_fine_indices", "x_gather", "x_merge"],
    "runtimes.pipeline": ["xǁCFViTPipelineǁrun"],
    "cfvit_deploy.checks": ["x_check_eta"],  # the gate's η check (runtimes.pipeline re-exports it)
    "cfvit_deploy.model": ["xǁCFViTǁselect", "xǁCFViTǁcoarse_stage", "x_confidence", "x_fine_indices"],
    # every criterion and check of validation (Criteria.describe is only the report's prose)
    "exporters.criteria": [
        "xǁ_Checkerǁ*",
        "xǁCriteriaǁfor_precision",
        "x__softmax_conf",
        "x_closeness_ratio",
        "x_relative_logit_error",
        "x_top2_margin",
    ],
    "exporters.validation": ["x_checkpoint_warning"],  # the graphs are compared with the right checkpoint
    # verification: checksums, the format version, graph paths that stay inside the export
    # (Manifest.from_dict's field parsing is pinned by the hypothesis fuzz test, not mutated here)
    "cfvit_deploy.manifest": [
        "xǁManifestǁverify",
        "xǁManifestǁload",
        "xǁManifestǁgraph_path",
        "x_sha256_file",
        "x__check_format_version",
    ],
    "cfvit_deploy.io": ["*"],  # atomic, no-clobber writes and the cleanup of dead writers' temporaries
    # decode, RGB conversion, resize, crop, normalise (PreprocessConfig's own field checks are not in scope)
    # (the one decoder: the pixel limit and the reason codes, the gray table look-up, the transform; _opened,
    # the allowlisted open, is a decorated context manager: pinned by test_decoder's allowlist tests instead)
    "cfvit_deploy.preprocessing": [
        "x_preprocess",
        "x__to_rgb",
        "x__to_rgb_or_gray",
        "x_load_image",
        "x_load_and_preprocess",
        "x__check_pixels",
        "x__image_error",
        "x__gray_to_8_bit",
        "x__transform",
        "x__resize_size",
    ],
}
# mutmut 3 does not mutate decorated functions (properties, CFViT.predict under torch.no_grad): the gate in
# CFViT.predict and PipelineResult.exit_rate are covered by the planted-bug tests of issue 16 instead.
KILLED = {1, 3, 36, -24, 24, 152, 255}  # test failure, pytest internal error, timeouts (mutmut's mapping)
SURVIVED = {0}


def _in_scope(key: str) -> bool:
    module, _, rest = key.rpartition(".")
    function = rest.split("__mutmut_")[0]
    return any(fnmatch.fnmatchcase(function, pattern) for pattern in SCOPE.get(module, []))


def prepare_exports() -> None:
    """With CFVIT_EXPORT_CACHE set (the Makefile does), export the fixtures once with the unmutated code:
    tests/conftest.py then reuses them in every mutant's test run instead of exporting again."""
    cache = os.environ.get("CFVIT_EXPORT_CACHE")
    if not cache:
        return
    sys.path.insert(0, str(ROOT))
    from exporters import export
    from tests.conftest import FIXTURE_NAMES, UpstreamFixture

    shutil.rmtree(cache, ignore_errors=True)
    for name in FIXTURE_NAMES:
        fx = UpstreamFixture(name)
        (Path(cache) / name).mkdir(parents=True)
        export(fx.pth, Path(cache) / name / "export", num_heads=fx.num_heads)


def run(extra: list[str]) -> int:
    prepare_exports()
    patterns = [f"{module}.{pattern}__mutmut_*" for module, globs in SCOPE.items() for pattern in globs]
    return subprocess.call([*MUTMUT, "run", *extra, *patterns], cwd=ROOT)


def _results() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in MUTANTS.rglob("*.py.meta"):
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if _in_scope(key):
                codes[key] = code
    return codes


def describe(key: str) -> str:
    """`module.function: -old / +new`: the mutant's changed lines, stable when line numbers move."""
    diff = subprocess.run([*MUTMUT, "show", key], cwd=ROOT, capture_output=True, text=True).stdout
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    function = key.split("__mutmut_")[0]
    return f"{function}: -{' '.join(minus)} / +{' '.join(plus)}"


def report() -> int:
    codes = _results()
    if not codes:
        print("no mutants in scope found: run `python tools/mutation.py run` first", file=sys.stderr)
        return 1
    accepted = json.loads(ACCEPTED.read_text()) if ACCEPTED.exists() else {}
    status = Counter(
        "killed" if c in KILLED else "survived" if c in SURVIVED else "not run" if c is None else f"other ({c})"
        for c in codes.values()
    )
    survivors = sorted((k for k, c in codes.items() if c in SURVIVED), key=lambda k: (k.split("__")[0], k))
    described = [(k, describe(k)) for k in survivors]
    tested = status["killed"] + status["survived"]
    score = 100.0 * status["killed"] / tested if tested else 0.0
    by_module = Counter(k.rpartition(".")[0] for k, c in codes.items() if c in KILLED | SURVIVED)
    killed_by_module = Counter(k.rpartition(".")[0] for k, c in codes.items() if c in KILLED)
    lines = [
        "# Mutation testing report (generated by `make mutation`; do not edit)",
        "",
        f"Score: **{score:.1f}%** killed ({status['killed']} of {tested} mutants run"
        + "".join(f"; {n} {s}" for s, n in sorted(status.items()) if s not in ("killed", "survived"))
        + ")",
        "",
        "| module | killed | run |",
        "|---|---:|---:|",
    ]
    lines += [f"| {m} | {killed_by_module[m]} | {n} |" for m, n in sorted(by_module.items())]
    lines += [
        "",
        f"## Survivors ({len(described)})",
        "",
        "Each kept survivor needs a reason in `accepted.json` (keyed by the description below).",
        "",
    ]
    unexplained = 0
    for key, desc in described:
        reason = accepted.get(desc)
        unexplained += reason is None
        lines.append(f"- `{key}` — `{desc}` — " + (f"accepted: {reason}" if reason else "**no reason recorded**"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "results.json").write_text(
        json.dumps(
            {"score_pct": score, "status": dict(status), "survivors": dict(described)}, indent=1, ensure_ascii=False
        )
    )
    print(
        f"mutation score {score:.1f}% ({status['killed']}/{tested}); {len(described)} survivors, "
        f"{unexplained} without a recorded reason -> {RESULTS / 'report.md'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("run", "report", "all"))
    parser.add_argument("mutmut_args", nargs="*", help="extra arguments for `mutmut run` (e.g. --max-children 2)")
    args = parser.parse_args(argv)
    if args.step in ("run", "all"):
        code = run(args.mutmut_args)
        if code != 0:  # e.g. the clean test run failed: no mutant was judged, so no report either
            print(f"mutmut run failed with exit code {code}", file=sys.stderr)
            return code
    return report() if args.step in ("report", "all") else 0


if __name__ == "__main__":
    sys.exit(main())
