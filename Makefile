# The two commands: `make demo` and `make test`. Each sets itself up from nothing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-mass test lint bench chaos setup clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The same fleet under the simulated Mass management service: its signed tasks say what to
# protect, and it is unreachable for one period.
demo-mass: $(STAMP)
	$(PY) scripts/demo.py --mass

# The Ceph tests need Debian's Ceph and its rbd binding in .venv: setup-ceph.sh sees to both;
# the vCenter tests a simulator built from Debian's govmomi: setup-vmware.sh; the Flower
# test Debian's Chromium: setup-flower.sh.
test: $(STAMP)
	bash scripts/setup-ceph.sh
	bash scripts/setup-vmware.sh
	bash scripts/setup-flower.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	bash scripts/setup-ceph.sh
	$(PY) bench/engine.py
	$(PY) bench/fleet.py
	$(PY) bench/scale.py
	$(PY) bench/gc.py
	$(PY) bench/targets.py
	$(PY) bench/ceph.py
	bash scripts/setup-vmware.sh
	$(PY) bench/vmware.py
	$(PY) bench/s3.py
	$(PY) bench/fusion.py
	$(PY) bench/mass.py

# Outside `make test`: about 15 minutes of kill -9 and Redis restarts, then every point checked.
chaos: $(STAMP)
	$(PY) scripts/chaos.py

clean:
	rm -rf .demo .bench .chaos .testrun* .pytest_cache .ruff_cache
