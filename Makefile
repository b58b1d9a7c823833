# fpo-dist: `make demo` runs the whole pipeline on the bundled task; `make test` runs the test suite.
# Both create .venv (if missing) and install the project with its pinned dependencies first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# re-install only when the dependency list changes
STAMP := $(VENV)/.fpo-installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo study study-real bench bench-realshape bench-peer bench-tdpo-offline tdpo-topm-approx tdpo-offline-demo real-sae feature-scale gpu-kit gpu-kit-rehearsal lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# DS_BUILD_OPS=0: DeepSpeed ops are JIT-compiled when first used, not at install time.
	# torch==2.13.0 is pinned in pyproject.toml: on a CPU machine pip takes the CPU build.
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,demo,wandb,lora,s3]"
	@rm -f $(VENV)/.fpo-installed-*
	@touch $@

# the whole pipeline on the bundled task: Ray cache job, DeepSpeed ZeRO-3 training of FPO, DPO, SimPO and
# TDPO2 on 2 CPU ranks, evaluation, report (its path is printed)
demo: install
	$(PY) -m fpo_dist.demo $(DEMO_ARGS)

# FPO's parts ablated on the demo task (10 arms x 10 training seeds, 2 jobs at a time; ~15 min on 2 idle cores) → docs/results/study/ (study.md, study.json, study.png); a rerun resumes from study_out/
study: install
	OMP_NUM_THREADS=1 $(PY) -m fpo_dist.demo.study $(STUDY_ARGS)

# FPO, DPO, SimPO, TDPO2 and FPO with α = 0 on Gemma 3 270M with the real SAE (docs/results/real-sae), on the
# count task, pairs from the model's own samples (5 arms x 5 training seeds, 2 jobs at a time; ~1 h on 2 idle
# cores) → docs/results/study-real/ (study.md, study.json, study.png); a rerun resumes from study_real_out/
study-real: install
	OMP_NUM_THREADS=1 $(PY) -m fpo_dist.demo.real_study $(STUDY_REAL_ARGS)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# the suite without the real-model and multi-process tests (seconds, for editing loops)
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not realmodel and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# static checks (ruff, pinned in the dev extra; configuration in pyproject.toml)
lint: install
	$(PY) -m ruff check .

# benchmarks: step cost per loss, cache throughput and size, loader overhead → bench/results/
bench: install
	OMP_NUM_THREADS=1 $(PY) -m bench.run $(BENCH_ARGS)

# the real shape (Gemma 3 270M + the real 4k SAE of `make real-sae`, a calibrated random 16k SAE as a contrast run,
# UltraFeedback-like lengths, 2 interleaved launches per training run; ~22 min on 2 cores) and the base CPU preset
# (~10 min more) in one run → bench/results/cpu.{json,md}
bench-realshape: install
	OMP_NUM_THREADS=1 $(PY) -m bench.run --preset cpu,realshape $(BENCH_ARGS)

# the peer bench (issue 22): TRL 1.16's DPOTrainer (dev extra) beside fpo-dist's DPO and FPO on the same cached token
# ids, order and batch, 1 process and 2 ranks under ZeRO-3, Gemma 3 270M, 2 interleaved rounds of 1 + 5 steps per run
# (~20 min) → bench/results/peer-cpu.{json,md}, its ratios merged into bench/results/cpu.json
bench-peer: install
	$(PY) -m bench.peer --preset realshape $(PEER_ARGS)

# offline TDPO (issue 23) at the real shape: tdpo2-offline (the cache's top-128 reference + tail, no reference model)
# beside tdpo2 (resident ZeRO-3 reference) and fpo, 2 ranks (~8 min) → bench/results/tdpo-offline-cpu.{json,md},
# its ratios merged into bench/results/cpu.json
bench-tdpo-offline: install
	OMP_NUM_THREADS=1 $(PY) -m bench.tdpo_offline $(TDPO_OFFLINE_ARGS)

# how good the top-M reference is on Gemma 3 270M, M in {8, 32, 128, 512}: the sequential KL, the TDPO2 loss and its
# gradient against the exact computation, and the cache's bytes per token (~6 min) → docs/results/tdpo-offline/approx.*
tdpo-topm-approx: install
	OMP_NUM_THREADS=2 $(PY) -m bench.topm_approx $(TOPM_APPROX_ARGS)

# offline TDPO2 (the cache's top-8) against online TDPO2 on the demo task, 10 training seeds (~5 min on 2 cores)
# → docs/results/tdpo-offline/demo/ (study.md, study.json, study.png); a rerun resumes from tdpo_offline_out/
tdpo-offline-demo: install
	OMP_NUM_THREADS=1 $(PY) -m fpo_dist.demo.tdpo_offline $(TDPO_OFFLINE_DEMO_ARGS)

# the real SAE (issue 21): a JumpReLU SAE (4,096 latents) on Gemma 3 270M's block 9, trained with sae-lens's own
# trainer on the docstrings of installed packages (~40 min on 2 cores) → docs/results/real-sae/ (sae/, quality.json)
real-sae: install
	$(PY) -m fpo_dist.sae_train --out docs/results/real-sae $(REAL_SAE_ARGS)

# the feature term's scale: FPO at the paper's settings for 50 steps with the real SAE and a calibrated random one
# (~30 min on 2 cores) → docs/results/feature-scale/ (scale.md, scale.json)
feature-scale: install
	$(PY) -m bench.feature_scale --out docs/results/feature-scale $(FEATURE_SCALE_ARGS)

# the GPU kit (issue 22): what the lent GPU machine's image lacks (DeepSpeed, Ray, Zarr, sae-lens, datasets and their
# requirements) as cp312 wheels installed into one tree, pruned and xz-packed → .gpu-kit/ (~32 MiB, ~3 min); a
# device run carries it (`carry: [".gpu-kit"]`) and bench/gpu.sh unpacks it there
gpu-kit: install
	$(PY) -m bench.gpu_kit build $(GPU_KIT_ARGS)

# the kit rehearsed here (~8 min): an emulated image (its packages only), the kit for this Python, the quick bench
gpu-kit-rehearsal: install
	bash bench/kit_rehearsal.sh
