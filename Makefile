# `make test`, `make lint` and `make demo` build everything they need from nothing: a .venv with the CPU build
# of torch, the package with its test and lint extras, and rsync for the remote-script tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
DEMO_STEPS ?= 40

.PHONY: test test-compat lint format demo venv sysdeps clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

# rsync is only needed by sync_to_remote.sh and its test; the test skips (saying why) if this fails.
sysdeps:
	@command -v rsync >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null && apt-get install -y -qq rsync >/dev/null) ; } || \
	  echo "note: rsync not installed; the sync_to_remote.sh test will be skipped"

test: $(STAMP) sysdeps
	$(PY) -m pytest tests -q

# The DeepSeek equivalence, remote-code and smoke tests under the oldest supported transformers and one 4.5x
# release, each in its own venv (.venv-tf4.51, .venv-tf4.57; same torch pin; pip picks the tokenizers and
# huggingface_hub each release wants). NPU_PARALLEL_UPSTREAM_DIR (see tests/upstream.py) adds DeepSeek's own code.
COMPAT_TRANSFORMERS ?= 4.51 4.57
COMPAT_VARIANTS := deepseek_v2,deepseek_v2_lite,deepseek_v2_group,deepseek_v3
COMPAT_TESTS := tests/test_equivalence.py tests/test_upstream_remote_code.py tests/test_remote_code_checkpoint.py tests/test_smoke_example.py

.venv-tf%/.installed: setup.py pyproject.toml
	test -x .venv-tf$*/bin/python || $(PYTHON) -m venv .venv-tf$*
	.venv-tf$*/bin/python -m pip install --quiet --upgrade pip
	.venv-tf$*/bin/python -m pip install --quiet "$(TORCH_PIN)"
	.venv-tf$*/bin/python -m pip install --quiet -e ".[test]" "transformers==$*.*"
	touch $@

test-compat: $(foreach v,$(COMPAT_TRANSFORMERS),.venv-tf$(v)/.installed)
	set -e; for v in $(COMPAT_TRANSFORMERS); do \
	  echo "== transformers $$v"; \
	  NPU_PARALLEL_TEST_VARIANTS=$(COMPAT_VARIANTS) .venv-tf$$v/bin/python -m pytest $(COMPAT_TESTS) -q -rs; \
	done

# ruff (lint + format check) over everything we wrote, mypy over the package; both configured in pyproject.toml
LINTED := npu_parallel tests benchmarks examples setup.py download_deepseek_moe.py
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 examples/train_deepseek_v2_lite.py \
	  --steps $(DEMO_STEPS) --batch_size 4 --max_length 128 --lr 2e-3 --warmup_steps 4 \
	  --save_dir $(DEMO)/ckpt --save_every 20 --log_dir $(DEMO) --workdir $(DEMO)
	$(VENV)/bin/npu-parallel merge $(DEMO)/ckpt/step-$(DEMO_STEPS) --out $(DEMO)/hf --overwrite -q
	@$(PY) -c "import sys; from npu_parallel.training.metrics import read_metrics; r = read_metrics('$(DEMO)/metrics.jsonl'); \
	  print(f'demo done: loss {r[0][\"loss\"]:.3f} -> {r[-1][\"loss\"]:.3f} in {len(r)} steps | metrics $(DEMO)/metrics.jsonl | ' \
	        f'loss curve $(DEMO)/loss.png | checkpoint $(DEMO)/ckpt/step-$(DEMO_STEPS) | Hugging Face model $(DEMO)/hf')"

clean:
	rm -rf $(VENV) .venv-tf* build *.egg-info .pytest_cache runs
