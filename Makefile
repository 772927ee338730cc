# Two commands: `make demo` and `make test`. Both create .venv when missing and
# install the project (CPU torch pinned for dev/CI, see requirements-dev.txt).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rectrain-installed

.PHONY: setup demo test faults clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -c constraints-dev.txt -e .
	touch $(STAMP)

# The demo: a small learnable dataset (made once), then a real ResNet-50 run at 64 px.
DEMO_DATA ?= demo_data
DEMO_ARGS ?= --epochs 6 --batch_size 32 --lr 0.1 --warmup_epochs 1 --target_size 64 --workers 2 \
             --print_freq 5 --run_name demo --val_every 1 --keep_checkpoints 2

demo: setup
	test -d $(DEMO_DATA)/train || $(PY) -m rectrain synth --out $(DEMO_DATA) --classes 8 \
	    --train_per_class 50 --val_per_class 15 --kind tiny --seed 0
	@if [ -d runs_rect_ddp/demo ]; then echo "make demo: removing the previous demo run runs_rect_ddp/demo (keep it: rename it first)"; fi
	rm -rf runs_rect_ddp/demo
	$(PY) train_g4.dn_12xlarge.py --data_dir $(DEMO_DATA) $(DEMO_ARGS)

# The suite in TEST_JOBS processes (pytest-xdist): its runs wait on subprocesses and workers, so one process
# leaves a 2-core machine half idle. TEST_JOBS=0 runs it in this process (for pdb, or one test at a time).
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal)

# The fault-injection suite with its long variants (14-16 min on 2 cores); rewrites docs/reliability.md.
faults: setup
	$(PY) benchmarks/reliability_report.py --soak

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(DEMO_DATA) runs_rect_ddp/demo
