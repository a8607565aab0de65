# Two commands do all set-up on a fresh machine (Python 3.10+ with pip and venv):
#   make quickstart   create .venv, tokenize the embedded corpus, train the quickstart model (W&B offline)
#   make test         create .venv, run the test suite
# torch is pinned through constraints.txt to the CPU build (no multi-GB CUDA download).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/quickstart
PYTEST_ARGS ?=

.PHONY: venv quickstart test lint clean bench bench-all gpu-check browser

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,sweep]"
	touch $@

venv: $(BIN)/.installed

$(DATA)/meta.json: | $(BIN)/.installed
	$(BIN)/cs336 prepare stdlib --out $(DATA) --tokenizer bpe --vocab-size 2048

quickstart: $(BIN)/.installed $(DATA)/meta.json
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/cs336 fit --config configs/quickstart.yaml

# The HTML report tests open the report in a real headless browser: Debian's chromium (installed when missing and
# this user may run apt-get; otherwise those tests say why they skip).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: chromium not installed; the browser tests will skip"

test: $(BIN)/.installed browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_callbacks.py --models quickstart,deep --threads 1

bench-all: bench
	$(BIN)/python benchmarks/bench_floor.py --threads 1
	$(BIN)/python benchmarks/bench_generate.py --threads 1
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_record.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs checkpoints data/quickstart
