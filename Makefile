# Two commands set up a fresh machine: `make demo` (main job: MNIST inpainting) and `make test`.
# Both create the virtualenv `.venv` on first use and install the package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo inpaint moons test benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: inpaint

inpaint: $(VENV)/.installed
	$(PY) -m experiments.inpaint --output outputs/inpainting.png

moons: $(VENV)/.installed
	$(PY) -m experiments.demo --output outputs/demo.png

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

benchmark: $(VENV)/.installed
	$(PY) -m experiments.benchmark --output_json outputs/benchmark.json

clean:
	rm -rf $(VENV) outputs
