# deconvis: the two commands of README.md, each building its own virtual environment when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deconvis-installed

.PHONY: demo test test-all bench mutate install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deconvis visualize --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_deconv.py --record
	$(PY) benchmarks/bench_mining.py --record
	$(PY) benchmarks/bench_scale.py --record
	$(PY) benchmarks/bench_occlusion.py --record
	$(PY) benchmarks/bench_featvis.py --record
	$(PY) benchmarks/bench_explore.py --record

# mutation testing of the engines and run-state code (not in CI; docs/testing.md): TARGETS=topk lock ...
mutate: $(STAMP)
	$(PY) -m pip install --quiet -e '.[mutate]'
	nice -n 19 $(PY) scripts/mutate.py $(TARGETS)

clean:
	rm -rf $(VENV) build *.egg-info .mutate
