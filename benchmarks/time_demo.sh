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
report() {  # LABEL START_NS
  local end; end=$(date +%s%N)
  local cpu; cpu=$(python3 -c "import resource as r; u = r.getrusage(r.RUSAGE_CHILDREN); print(f'{u.ru_utime + u.ru_stime:.0f}')")
  printf '%s: wall %.0f s, CPU %s s (children)\n' "$1" "$(( (end - $2) / 1000000 ))e-3" "$cpu"
}
case $mode in
  quick)
    python=${2:-.venv/bin/python}
    start=$(date +%s%N)
    "$python" -c 'import sys, cli; sys.exit(cli.main(sys.argv[1:]))' demo --quick --out "$work/demo" 2>"$work/log" ||
      { cat "$work/log"; exit 1; }
    report "cfvit demo --quick" "$start"
    grep '^\[demo\]' "$work/log"
    ;;
  fresh)
    git clone -q "$PWD" "$work/clone"
    cd "$work/clone"
    start=$(date +%s%N)
    make demo >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
    report "make demo on a fresh clone (install included)" "$start"
    grep '^\[demo\]' "$work/log"
    ;;
  *) echo "usage: $0 quick [PYTHON] | fresh" >&2; exit 2 ;;
esac
