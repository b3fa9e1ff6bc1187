# cxr-ray: the two commands a new user runs are `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-run

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

CXR    := $(VENV)/bin/cxr-ray
COHORT ?= Effusion
TRAIN  := --shards $(DEMO)/shards --cohort $(COHORT) --width 0.25 --batch-size 16

# The main job so far: embedded data -> shards -> stage 1 -> LR range test -> stage 2 (CLR).
# Re-running is cheap: prepare skips a complete shard set, finished runs are not retrained.
demo: $(STAMP)
	$(CXR) synth --out $(DEMO)/data --per-class 30 --size 256
	$(CXR) cohorts --metadata $(DEMO)/data/Data_Entry_2017.csv --cohort $(COHORT)
	$(CXR) prepare --data $(DEMO)/data --out $(DEMO)/shards --size 64
	$(CXR) train $(TRAIN) --out $(DEMO)/runs/$(COHORT)-stage1 --epochs 3
	$(CXR) lr-find $(TRAIN) --init-from $(DEMO)/runs/$(COHORT)-stage1 --out $(DEMO)/runs/$(COHORT)-lr-find
	$(CXR) train $(TRAIN) --out $(DEMO)/runs/$(COHORT)-triangular --epochs 4 \
	    --init-from $(DEMO)/runs/$(COHORT)-stage1 --policy triangular --step-size-epochs 1 \
	    --lr-bounds $(DEMO)/runs/$(COHORT)-lr-find/lr_find.json
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO)/runs"

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache
