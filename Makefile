# The two commands of the README: `make train` (main job) and `make test` (whole suite).
PY := .venv/bin/python

.PHONY: train test lint bench clean

train:
	scripts/bootstrap.sh
	$(PY) examples/train_gpt_stdlib.py

test:
	scripts/bootstrap.sh test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint:
	scripts/bootstrap.sh test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench:
	benchmarks/setup_peers.sh
	$(PY) benchmarks/optimizer_step.py

clean:
	rm -rf .venv .pytest_cache build src/*.egg-info
