#!/usr/bin/env bash
# The inference-only install the README promises (issue 12 item 3), checked on a real wheel:
#   1. build the wheel; install it WITHOUT extras into a fresh virtual environment (torch must not be importable);
#   2. `cfvit --help`, `-h` and `--version` work there, and `make-data` (base dependencies only);
#   3. `cfvit infer` on an export made by the full environment gives the same rows as the full environment;
#   4. every command that needs an extra fails with exactly one `error:` line naming it, and exit 1.
# Usage: .ci/base_install_check.sh [FULL_PYTHON]   (default .venv/bin/python; CFVIT_FIXTURES as in tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FULL=${1:-${FULL_PYTHON:-$ROOT/.venv/bin/python}}
case $FULL in /*) ;; *) FULL=$ROOT/$FULL ;; esac  # the checks below run from another directory
FIXTURES=${CFVIT_FIXTURES:-$ROOT/../shared/fixtures/upstream}
WORK=$(mktemp -d /tmp/cfvit-base-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # the base environment must see only what the wheel installed
say() { printf '[base-install] %s\n' "$*"; }
fail() { printf '[base-install] FAILED: %s\n' "$*" >&2; exit 1; }
full_cfvit() { (cd "$ROOT" && "$FULL" -c 'import sys, cli; sys.exit(cli.main(sys.argv[1:]))' "$@"); }

say "building the wheel"
"$FULL" -m pip wheel --no-deps -q -w "$WORK/dist" "$ROOT" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; fail "pip wheel"; }
WHEEL=$(ls "$WORK"/dist/cfvit_deploy-*.whl)

say "installing $(basename "$WHEEL") without extras into a fresh venv"
"$FULL" -m venv "$WORK/base"
BASE=$WORK/base/bin
"$BASE/python" -m pip install -q "$WHEEL" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; fail "pip install"; }
"$BASE/python" -m pip list --format=freeze | tee "$WORK/resolved.txt" | sed 's/^/[base-install]   /'
cd "$WORK"  # away from the source tree: the base environment runs the installed package
for module in torch onnx onnxsim matplotlib psutil ray pyarrow openvino; do
  if "$BASE/python" -c "import $module" 2>/dev/null; then fail "$module is importable in the base install"; fi
done
grep -qi '^torch=' "$WORK/resolved.txt" && fail "torch was resolved for the base install"

say "help, version, make-data"
"$BASE/cfvit" --help | grep -q "Usage: cfvit" || fail "cfvit --help"
"$BASE/cfvit" -h >/dev/null || fail "cfvit -h"
version=$("$BASE/cfvit" --version)
[[ $version == "cfvit-deploy $("$FULL" -c 'import cfvit_deploy; print(cfvit_deploy.__version__)')" ]] ||
  fail "cfvit --version printed '$version'"
"$BASE/cfvit" make-data "$WORK/data" --per-class 2 --val-per-class 1 --image-size 64 >/dev/null ||
  fail "make-data in the base install"

say "infer: base install vs full environment on the same export"
num_heads=$("$FULL" -c "import json, sys; print(json.load(open(sys.argv[1]))['num_heads'])" "$FIXTURES/deit_g7.json")
full_cfvit export "$FIXTURES/deit_g7.pth" --out "$WORK/export" --num-heads "$num_heads" 2>/dev/null
full_cfvit infer "$WORK/export" "$WORK/data" -r -o "$WORK/full.csv" 2>/dev/null
"$BASE/cfvit" infer "$WORK/export" "$WORK/data" -r -o "$WORK/base.csv" 2>/dev/null || fail "infer in the base install"
"$BASE/python" - "$WORK/full.csv" "$WORK/base.csv" <<'EOF' || fail "infer rows differ between the installs"
import csv, math, sys

def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not any(t in k for t in ("_ms", "_s", "time"))} for r in csv.DictReader(f)]

full, base = rows(sys.argv[1]), rows(sys.argv[2])
assert len(full) == len(base) > 0, (len(full), len(base))
for a, b in zip(full, base):
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for key in a:
        try:
            same = math.isclose(float(a[key]), float(b[key]), rel_tol=1e-6, abs_tol=1e-7)
        except ValueError:
            same = a[key] == b[key]
        assert same, (key, a[key], b[key])
print(f"[base-install]   {len(full)} rows identical")
EOF

say "every command that needs an extra: one error line naming it, exit 1"
check_extra() {  # EXTRA ARGS...
  local extra=$1; shift
  local code=0
  "$BASE/cfvit" "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" || code=$?
  local lines; lines=$(wc -l <"$WORK/err.txt")
  if [[ $code != 1 || $lines != 1 ]] || ! grep -q "^error: .*pip install 'cfvit-deploy\[$extra\]'$" "$WORK/err.txt"; then
    cat "$WORK/err.txt" >&2
    fail "cfvit $* (exit $code, $lines stderr lines; expected 1 and one line naming [$extra])"
  fi
  say "  ok [$extra] cfvit $*"
}
check_extra export export "$FIXTURES/deit_g7.pth" --out "$WORK/x1"
check_extra export validate "$WORK/export"
check_extra train train "$WORK/data" --out "$WORK/x2.pth"
check_extra bench bench "$WORK/export" --out "$WORK/x3"
check_extra bench bench "$WORK/export" --precisions int8
check_extra bench sweep "$WORK/export" "$WORK/data/val" --out "$WORK/x4"
check_extra export,train,bench demo --out "$WORK/x5"
check_extra parquet infer "$WORK/export" "$WORK/data" -r -o "$WORK/x6.parquet"
check_extra ray infer "$WORK/export" "$WORK/data" -r --engine ray
check_extra openvino infer "$WORK/export" "$WORK/data" -r --provider openvino
for leftover in x1 x2.pth x3 x4 x5 x6.parquet; do
  [[ -e $WORK/$leftover ]] && fail "a refused command left $leftover behind"
done
say "passed"
