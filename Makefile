# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_STEPS ?= 2000

.PHONY: demo test venv test-venv info bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test-venv: $(VENV)/.test-installed

# Train the tiny model on the embedded procedural dataset (CPU, minutes), then show where the samples are.
demo: $(VENV)/.installed
	$(PY) -m lens_jax.train --config configs/tiny.py --workdir $(DEMO_DIR) --config.total_steps=$(DEMO_STEPS)
	@echo "sample grid: $(abspath $(DEMO_DIR))/samples/latest.png"
	$(PY) -m lens_jax.generate --weights $(DEMO_DIR) --prompt "a red circle and a blue square" --width 32 --height 32 --seed 0 --out $(DEMO_DIR)/generated.png

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -ra tests

info: $(VENV)/.installed
	$(PY) -m lens_jax.info --config configs/lens_3p8b.py

bench: $(VENV)/.installed
	$(PY) -m lens_jax.bench train --config configs/tiny.py

clean:
	rm -rf $(VENV) runs .pytest_cache
