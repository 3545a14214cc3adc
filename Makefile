# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if needed, then run the main job on the synthetic demo
#   make test   create .venv (with the test extra) if needed, then run the tests
# and, for day-to-day work:
#   make test-fast   the suite without its end-to-end training runs (tests marked slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-fast clean-venv

$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(PY) -m faer_jax.train --config configs/demo.py --workdir $(WORKDIR)
	$(PY) -m faer_jax.evaluate --workdir $(WORKDIR) --checkpoint best

test: $(VENV)/.installed-test
	$(PY) -m ruff check -q faer_jax tests configs
	$(PY) -m pytest -q -n 2 --dist worksteal tests

test-fast: $(VENV)/.installed-test
	$(PY) -m ruff check -q faer_jax tests configs
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
