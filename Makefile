# Two entry points for a fresh machine (both create .venv when it is absent, and are idempotent):
#   make demo   set up, then run the main job on the embedded synthetic catalogue
#   make test   set up, then run the test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= cpu,text,dev

.PHONY: setup test test-fast demo transfer transfer-quick lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned pair (torchvision is needed by open_clip)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) launcher/demo.py --out runs/demo

# the real transfer experiment: four Amazon sources -> Scientific (hours on 2 cores), or a slice of it (minutes)
transfer: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) launcher/transfer.py --out runs/transfer

transfer-quick: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) launcher/transfer.py --quick --out runs/transfer-quick --quiet

lint: $(STAMP)
	$(VENV)/bin/ruff check missrec launcher tests

clean:
	rm -rf runs/demo .pytest_cache
