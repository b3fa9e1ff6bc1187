# cxr-ray: the two commands a new user runs are `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-run

.PHONY: venv demo test test-unit test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

CXR    := $(VENV)/bin/cxr-ray
EXP    := $(DEMO)/experiments/demo

# The main job: embedded data -> Parquet shards -> the whole study (15 cohorts x 7 lr
# policies: stage 1, LR range tests, stage 2) with Ray Tune -> report. Re-running resumes:
# synth and prepare skip complete outputs, the sweep skips finished trials.
demo: $(STAMP)
	@start=$$(date +%s); set -e; \
	$(CXR) synth --out $(DEMO)/data --per-class 150 --size 256; \
	$(CXR) prepare --data $(DEMO)/data --out $(DEMO)/shards --size 48; \
	$(CXR) sweep --config jobs/demo.toml; \
	sed -n '/^## Policy ranking/,/^## Best policy/p' $(EXP)/report/report.md | sed '$$d'; \
	grep -h '^\*\*The validation-chosen' $(EXP)/report/report.md | tr -d '*'; \
	echo "report:      $(EXP)/report/report.md (plots beside it, every trial in results.csv)"; \
	echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(EXP)"; \
	echo "make demo: $$(( $$(date +%s) - start )) s wall time (after installation)"

# Unit tests first, with `import ray` made to fail (they must run without Ray), then the
# integration tests (a local Ray) and the cluster tests (jobs, autoscaling, cluster.yaml).
test: $(STAMP)
	CXR_RAY_BLOCK_RAY=1 $(PY) -m pytest tests/unit
	$(PY) -m pytest tests/integration tests/cluster

test-unit: $(STAMP)
	CXR_RAY_BLOCK_RAY=1 $(PY) -m pytest tests/unit

test-fast: $(STAMP)
	CXR_RAY_BLOCK_RAY=1 $(PY) -m pytest tests/unit -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache
