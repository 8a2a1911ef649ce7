# The two commands of the README: `make train` (main job) and `make test` (whole suite).
PY := .venv/bin/python

.PHONY: train test test-fast docs lint bench bench-setup compare clean

train:
	scripts/bootstrap.sh plot
	.venv/bin/flora train --overwrite

# lint; the library's tests and the experiments' (experiments/tests) in one pytest run; the
# docs in strict mode; the package built, installed into a fresh venv and run
test:
	scripts/bootstrap.sh test,docs experiments
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs
	$(PY) scripts/check_package.py

# day to day: the tests not marked slow (no multi-process or end-to-end runs), no docs/package
test-fast:
	scripts/bootstrap.sh test,docs experiments
	$(PY) -m pytest -q -m "not slow and not network"

docs:
	scripts/bootstrap.sh test,docs experiments
	$(PY) -m sphinx -W --keep-going -b html docs build/docs

lint:
	scripts/bootstrap.sh test,docs experiments
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# the peers (flora-opt, galore-torch, apollo-torch, peft) come with the experiments package
bench-setup:
	scripts/bootstrap.sh bench "experiments[minilm]"

bench: bench-setup
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/accumulation.py

# the paper's experiments at their quick size, side by side with the peers (about 3 h on 2 cores)
compare: bench-setup
	.venv/bin/flora-experiments all --quick --out benchmarks/results/compare

clean:
	rm -rf .venv .pytest_cache build src/*.egg-info runs
