# The two commands of the README: `make train` (main job) and `make test` (whole suite).
PY := .venv/bin/python

.PHONY: train test lint bench bench-setup clean

train:
	scripts/bootstrap.sh plot
	.venv/bin/flora train

test:
	scripts/bootstrap.sh test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint:
	scripts/bootstrap.sh test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# peers for side-by-side benchmarks: flora-opt imports bitsandbytes and accelerate; --no-deps
# keeps pip from replacing the installed torch with another build
bench-setup:
	scripts/bootstrap.sh bench
	$(PY) -m pip install -q --no-deps flora-opt==0.0.3 bitsandbytes
	$(PY) -m pip install -q accelerate

bench: bench-setup
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/accumulation.py

clean:
	rm -rf .venv .pytest_cache build src/*.egg-info runs
