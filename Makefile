# Two commands from a fresh clone:  `make demo`  and  `make test`.
# GPU users: install their CUDA build of torch into the venv first, then run `make demo TORCH=` (see README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
RECIPE ?= recipes/shapes_tiny.toml
RUN ?= runs/shapes_tiny
DATA ?= data/shapes

.PHONY: install demo test data train grid evaluate clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) tools/make_shapes_shards.py --out $(DATA)

train: install
	$(PY) -m transfusion.train $(RECIPE) --run.dir=$(RUN)

grid: install
	$(PY) tools/generate.py --export $(RUN)/export --grid $(RUN)/samples/grid.png

evaluate: install
	$(PY) tools/evaluate.py --run $(RUN)

demo: install
	$(MAKE) --no-print-directory data train grid evaluate

test: install
	$(PY) -m pytest

clean:
	rm -rf $(RUN) $(DATA)
