# Two commands do everything on a fresh machine:
#   make demo   - creates .venv if missing, generates a replica case, runs the algorithm on it
#   make test   - creates .venv if missing, runs the whole test suite; the container test runs when a Docker
#                 engine answers (INSTALL_DOCKER=1 lets it install and start one, as CI does; needs root)
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test test-fast container-test benchmark clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m training demo

# The container test runs first: it builds the image from this tree in both variants (API=both: exec and
# invoke), and the docker runner test of test/test_benchmark.py then compares the exec image with the
# local runner. Without a Docker engine it says so and is skipped (tools/run_container.sh).
# EXPECT_EMPTY=any: the bundled replica demo weights do not yet answer -1 on a case without abdomen, so
# the container test checks the contract there, not the model's decision.
test: $(STAMP)
	API=both EXPECT_EMPTY=any bash tools/run_container.sh
	$(PY) -m pytest -q test

test-fast: $(STAMP)
	$(PY) -m pytest -q test -m "not slow"

container-test: $(STAMP)
	API=both EXPECT_EMPTY=any bash tools/run_container.sh

benchmark: $(STAMP)
	$(PY) -m training speed --config small --json build/benchmark.json

clean:
	rm -rf build demo_output test/cases .pytest_cache
