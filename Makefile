# Two entry points for a fresh machine: `make demo` (the pipeline on the CPU demo) and `make test`.
# Both create .venv on first use and reuse it afterwards (re-installing only when pyproject.toml changes).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test demo check bench clean-results

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.installed-*
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/snakemake --cores all --configfile configs/pipeline/demo.yaml

check: venv  # the finished demo against its reference output (results/demo/expected.json), by its conclusions
	$(PY) -m speedpipe.check results/demo

bench: venv
	$(PY) benchmarks/train_step.py --model DiT-S/2 --batch 32

clean-results:
	find results -mindepth 1 -not -name README.md -delete
