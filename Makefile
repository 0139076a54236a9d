# The two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: venv test test-fast demo bench clean

# Everything (all extras and the test tools): what `make test` and CI use.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $(STAMP) $(DEMO_STAMP)

# Only what the demo runs (export, train, bench): a fresh `make demo` skips Ray, OpenVINO, the server
# and the test tools, which it never imports.
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[export,train,bench]"
	touch $(DEMO_STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(DEMO_STAMP)
	$(BIN)/cfvit demo --out runs/demo --force

bench: $(STAMP)
	$(BIN)/python benchmarks/run_headline.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# -- mutation testing (not in CI; 36 min measured on a 2-core AVX2 machine): mutmut on the gate/merge, selection/EMA,
# validation criteria, manifest verification, atomic writes and preprocessing; see docs/mutation.md.
# Writes benchmarks/results/mutation/report.md (score + survivors, with the reasons in accepted.json).
CFVIT_FIXTURES ?= $(abspath $(CURDIR)/../shared/fixtures/upstream)
.PHONY: mutation mutation-report
mutation: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[mutation]"
	rm -rf mutants  # a fresh copy of the code and tests: no stale mutants or test stats
	CFVIT_FIXTURES=$(CFVIT_FIXTURES) CFVIT_EXPORT_CACHE=$(CURDIR)/.mutation-exports PYTHONPATH=. \
		$(BIN)/python tools/mutation.py all

mutation-report: $(STAMP)
	$(BIN)/python tools/mutation.py report
