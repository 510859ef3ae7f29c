# Two commands from a fresh clone:  `make demo` (set up, then run the demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; on a GPU machine install the CUDA build first (see README).
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check glm4 tests bench
	$(BIN)/ruff format --check glm4 tests bench

demo: setup
	$(BIN)/glm4 generate "What is the capital of France?"
	$(BIN)/glm4 generate "What is 3 + 4?"
	$(BIN)/glm4 generate "What is the weather in Paris?" --tools examples/tools.json
	@echo
	@echo 'Chat with it:  $(BIN)/glm4 chat      (a toy: it knows capitals, small sums and one tool)'
	@echo 'Real weights:  $(BIN)/glm4 chat --model THUDM/GLM-4-9B-0414'

clean:
	rm -rf $(VENV) .pytest_cache
