#!/usr/bin/env bash
# Time the demo as a new user meets it (issue 12 item 9: `make demo` on a fresh clone within 5 minutes,
# install included), and `cfvit demo --quick` (the README quotes both).
#   benchmarks/time_demo.sh quick [PYTHON]   `cfvit demo --quick` with PYTHON (default .venv/bin/python)
#   benchmarks/time_demo.sh fresh            `git clone` of this checkout's HEAD into /tmp, then `make demo`
# Prints wall and CPU seconds (CPU time is the steadier number on a shared machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
work=$(mktemp -d /tmp/cfvit-time-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
timed() {  # LABEL CMD...: wall and CPU (user + sys of the command and its children) seconds
  local label=$1; shift
  local TIMEFORMAT='%R %U %S'
  { time "$@" >"$work/log" 2>&1 ; } 2>"$work/time" || { cat "$work/log"; exit 1; }
  read -r wall user sys <"$work/time"
  python3 -c "import sys; w, u, s = map(float, sys.argv[2:]); print(f'{sys.argv[1]}: wall {w:.0f} s, CPU {u + s:.0f} s')" \
    "$label" "$wall" "$user" "$sys"
  grep '^\[demo\]' "$work/log" || true
}
case $mode in
  quick)
    python=${2:-.venv/bin/python}
    timed "cfvit demo --quick" "$python" -c 'import sys, cli; sys.exit(cli.main(sys.argv[1:]))' \
      demo --quick --out "$work/demo"
    ;;
  fresh)
    git clone -q "$PWD" "$work/clone"
    cd "$work/clone"
    timed "make demo on a fresh clone (install included)" make demo
    ;;
  *) echo "usage: $0 quick [PYTHON] | fresh" >&2; exit 2 ;;
esac
