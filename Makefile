# Developer shortcuts; README.md shows the full commands.
PY ?= python3

.PHONY: build test test-c test-pure test-unit fuzz bench annotate debug lint demo

build:
	$(PY) -m pip install -e '.[dev]'

# both passes, in two lanes side by side (tests/run_passes.py): what CI runs; test-c and test-pure run one each
test:
	$(PY) tests/run_passes.py

test-c:
	STATEFUN_MESH_REQUIRE_EXTENSIONS=1 $(PY) -m pytest

test-pure:
	STATEFUN_MESH_NO_EXTENSIONS=1 $(PY) -m pytest

# the tests that open no real socket and start no process (a quick check while editing)
test-unit:
	STATEFUN_MESH_REQUIRE_EXTENSIONS=1 $(PY) -m pytest -q -m "not integration"

# The fuzz tests at their --run-slow budget (over 1,000,000 inputs): the differential decoder
# fuzz once (it runs both cores), the endpoint fuzz on a peer of each core.
FUZZ_SLOW = $(PY) -m pytest -q --run-slow -o faulthandler_timeout=0
fuzz:
	STATEFUN_MESH_REQUIRE_EXTENSIONS=1 $(FUZZ_SLOW) tests/unit/test_fuzz_frames.py tests/integration/test_fuzz_endpoints.py
	STATEFUN_MESH_NO_EXTENSIONS=1 $(FUZZ_SLOW) tests/integration/test_fuzz_endpoints.py

bench:
	$(PY) -m pytest bench --benchmark-only
	$(PY) bench/mesh_perf.py

annotate:
	cython -3 -a csrc/_speedups_c.pyx -o /tmp/_speedups_c.c && mv /tmp/_speedups_c.html csrc/

debug:
	STATEFUN_MESH_CYTHON_TRACE=1 $(PY) -m pip install -e . --no-build-isolation

lint:
	$(PY) -m ruff check statefun_mesh tests bench examples
	$(PY) -m ruff format --check statefun_mesh tests bench examples
	$(PY) -m mypy

demo:
	$(PY) -m examples.greeter
