"""The embedded default: the whole pipeline on the bundled task, through the real entry points.

    python -m fpo_dist.demo [--out DIR] [--losses fpo,dpo,simpo,tdpo2] [--steps N]

1. writes the task's train / held-out preference pairs (``fpo_dist.demo.task``);
2. starts a Ray head on loopback and builds the reference cache with ``ray job submit -- python -m fpo_dist.cache``
   from the bundled reference model and SAE (``fpo_dist/demo/assets``), and with the same config a second cache of
   the held-out pairs;
3. trains each method with ``deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json`` (ZeRO-3;
   on a CPU machine 2 CPU ranks over gloo), evaluating on the held-out cache during training (``--eval_cache``);
4. evaluates every policy against the reference on held-out prompts (``fpo_dist.evaluate``: pairwise preference
   accuracy, the judge's win rate on sampled generations, generation entropy, feature drift) and reads step time
   and peak memory from the training logs;
5. writes ``report.md`` (a table per method), PNG training curves and AlpacaEval-format generations into the
   output directory, whose path is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fpo_dist.demo import task
from fpo_dist.demo.recipe import RECIPE

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).resolve().parent / "assets"
LOSSES = ("fpo", "dpo", "simpo", "tdpo2")
CURVES = ("loss", "reward_accuracy", "margin", "feature_mse_rejected")
MARKER = ".fpo-demo-output"


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], log: Path, what: str, progress=None) -> None:
    """Run ``cmd`` in its own process group, streaming its notable lines to the console and all of its output to
    ``log``; ``progress()`` (if given) is called every few seconds to print a progress line."""
    say(f"{what}: {' '.join(cmd[:6])} …  (log: {log})")
    stop = threading.Event()

    def report_progress() -> None:
        while not stop.wait(5):
            progress()

    if progress is not None:
        threading.Thread(target=report_progress, daemon=True).start()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, bufsize=1)
        try:
            for line in proc.stdout:
                f.write(line)
                if _interesting(line):
                    sys.stdout.write("    " + line.rstrip()[-160:] + "\n")
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            stop.set()
            _kill_group(proc)
    if rc != 0:
        raise SystemExit(f"{what} failed (exit {rc}); see {log}")


def _interesting(line: str) -> bool:
    keys = ("cache done", "rows:", "worker ", "bad rows", "step-0 check", "resident models", "exported", "data:",
            "checkpoint", "Error", "error", "succeeded", "failed")
    return any(k in line for k in keys)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------- stages


def _cache_config(source: Path, store: Path, path: Path, manifest: dict) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "model": {"name_or_path": str(ASSETS / "model")},
        "sae": {"source": str(ASSETS / "sae"), "layer": manifest["sae"]["hook_layer"]},
        "data": {"source": str(source), "max_length": RECIPE.max_length,
                 "max_prompt_length": RECIPE.max_prompt_length},
        "output": str(store), "workers": 2, "cpus_per_worker": 1, "device": "cpu",
        "rows_per_shard": 256, "chunk_rows": 128, "batch_size": 64, "overwrite": True,
    }, indent=1))
    return path


def build_cache(data: dict[str, Path], out: Path, manifest: dict) -> tuple[Path, Path]:
    """A Ray head on loopback (stopped by process group afterwards) and ``ray job submit`` of the cache job: the
    training cache, then the held-out cache with the same config (what ``--eval_cache`` expects)."""
    store, eval_store = out / "cache", out / "eval_cache"
    cfgs = [_cache_config(data["train"], store, out / "cache.yaml", manifest),
            _cache_config(data["heldout"], eval_store, out / "eval_cache.yaml", manifest)]
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="fpo-demo-ray-", dir="/tmp")  # short: AF_UNIX paths < 108 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    head_log = out / "logs" / "ray_head.log"
    say(f"starting a Ray head on 127.0.0.1:{port} (dashboard :{dash}, 2 CPUs)")
    log_file = open(head_log, "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--dashboard-agent-listen-port=0",
         "--num-cpus=2", f"--temp-dir={ray_tmp}", "--include-dashboard=true", "--disable-usage-stats",
         f"--object-store-memory={128 << 20}"],
        cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_dashboard(dash, head, head_log)
        for cfg, what in zip(cfgs, ("cache", "eval_cache")):
            _run([ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                  "--", "python", "-m", "fpo_dist.cache", "--config", str(cfg)], out / "logs" / f"{what}.log",
                 f"{what.replace('_', ' ')} job (Ray, 2 CPU workers)")
    finally:
        _kill_group(head)
        head.wait(timeout=30)
        log_file.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return store, eval_store


def _wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise SystemExit(f"the Ray head exited (code {head.returncode}); see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the Ray dashboard did not come up within {timeout:.0f} s; see {log}")


def train(loss: str, store: Path, eval_store: Path, out: Path, steps: int) -> Path:
    run_dir = out / "runs" / loss
    per_rank = RECIPE.batch_pairs // 2
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "launchers/train.py", "--deepspeed", "ds_configs/zero3.json", "--cache", str(store),
           "--output_dir", str(run_dir), "--loss.name", loss, "--loss.beta", str(RECIPE.beta_for(loss)),
           "--loss.alpha", str(RECIPE.alpha), "--loss.k", str(RECIPE.k), "--loss.topk_mode", RECIPE.topk_mode,
           "--loss.gamma", str(RECIPE.simpo_gamma), "--optim.lr", str(RECIPE.lr),
           "--optim.warmup_steps", str(RECIPE.warmup_steps), "--optim.grad_clip", str(RECIPE.grad_clip),
           "--micro_batch_size", str(per_rank), "--grad_accum", "1", "--max_steps", str(steps), "--seed", "0",
           "--log_every", "1", "--keep_last", "1", "--eval_cache", str(eval_store),
           "--eval_every", str(RECIPE.eval_every)]
    t0 = time.time()
    seen = [0]

    def progress() -> None:
        path = run_dir / "metrics.jsonl"
        rows = [r for r in path.read_text().splitlines() if '"loss"' in r] if path.exists() else []
        if rows and len(rows) != seen[0]:
            seen[0] = len(rows)
            r = json.loads(rows[-1])
            extra = f", feature MSE (rejected) {r['feature_mse_rejected']:.2e}" if "feature_mse_rejected" in r else ""
            say(f"  {loss} step {r['step']}/{steps}: loss {r['loss']:.4f}, reward accuracy "
                f"{r['reward_accuracy']:.2f}, {r['step_time_s']:.2f} s/step{extra}")

    _run(cmd, out / "logs" / f"train_{loss}.log", f"train {loss} (DeepSpeed ZeRO-3, 2 ranks, {steps} steps)",
         progress)
    say(f"train {loss}: {time.time() - t0:.0f} s")
    return run_dir


def evaluate_all(runs: dict[str, Path], data: dict[str, Path], out: Path, manifest: dict) -> dict[str, dict]:
    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import GenerationConfig, evaluate

    heldout = DataConfig(source=str(data["heldout"]), max_length=RECIPE.max_length,
                         max_prompt_length=RECIPE.max_prompt_length)
    gen = GenerationConfig(max_new_tokens=RECIPE.max_new_tokens, temperature=RECIPE.temperature, top_p=RECIPE.top_p,
                           seed=0, batch_size=64, samples_per_prompt=RECIPE.samples_per_prompt)
    results = {}
    for name, policy in [("reference", ASSETS / "model")] + [(k, v / "hf") for k, v in runs.items()]:
        t0 = time.time()
        beta = RECIPE.beta_for(name) if name != "reference" else 0.1
        m = evaluate(str(policy), heldout, reference_dir=str(ASSETS / "model"), sae_source=str(ASSETS / "sae"),
                     sae_layer=manifest["sae"]["hook_layer"], judge=task.pairwise_judge, generation=gen, beta=beta,
                     out_dir=out / "eval" / name)
        outputs = json.loads((out / "eval" / name / "policy_outputs.json").read_text())
        m["rule_follow"] = task.follow_rate([o["instruction"] for o in outputs], [o["output"] for o in outputs])
        results[name] = m
        say(f"evaluated {name}: win rate vs reference {m['win_rate']:.3f}, rule-follow {m['rule_follow']:.3f} "
            f"({time.time() - t0:.0f} s)")
    return results


# --------------------------------------------------------------------------------------------- report


def _train_stats(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    steady = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    return {"median_step_s": statistics.median(steady), "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:] or rows), "rows": rows,
            "evals": evals}


def plot_curves(stats: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, (name, s) in enumerate(stats.items()):
            color = f"C{i}"
            xs = [r["step"] for r in s["rows"] if key in r]
            if xs:
                ax.plot(xs, [r[key] for r in s["rows"] if key in r], label=f"{name} (train)", color=color, alpha=0.6)
            evals = [r for r in s.get("evals", []) if f"eval/{key}" in r]
            if evals:  # the held-out cache's curve next to the training one
                ax.plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], "o--", color=color,
                        label=f"{name} (held-out)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{key.replace('_', ' ')}: training batches and held-out cache")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "plots" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: dict, stats: dict, out: Path, timings: dict, steps: int) -> Path:
    lines = [
        "# fpo-dist demo report",
        "",
        "Task: *stay on topic* (`fpo_dist/demo/task.py`): a response must name the requested category and list exactly "
        "the requested number of distinct items of it. The reference (SFT on a mix) follows the rule on about a third "
        f"of its samples. Each method trained {steps} optimizer steps (global batch {RECIPE.batch_pairs} pairs, "
        "DeepSpeed ZeRO-3 on 2 CPU ranks) from the same Ray-built cache; evaluation on held-out prompts.",
        "",
        "| method | pairwise acc. (LN) | reward acc. | judge win rate vs ref | rule-follow | entropy | feature MSE "
        "vs ref | median step (s) | peak mem / rank (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        s = stats.get(name)
        step = f"{s['median_step_s']:.3f}" if s else "—"
        mem = f"{s['peak_memory_mb']:.0f}" if s else "—"
        lines.append(
            f"| {name} | {m['accuracy_ln']:.3f} | {m.get('reward_accuracy_ln', float('nan')):.3f} | "
            f"{m['win_rate']:.3f} | {m['rule_follow']:.3f} | {m['entropy']:.3f} | {m.get('feature_mse', 0):.2e} | "
            f"{step} | {mem} |"
        )
    lines += [
        "",
        "- *pairwise acc. (LN)*: the policy's length-normalised log-prob ranks each held-out chosen response above its "
        "own rejected one. *reward acc.*: the same for the implicit reward avg logπθ − avg logπref (0 for the reference).",
        "- *judge win rate*: the programmatic judge on sampled generations (temperature "
        f"{RECIPE.temperature}, {RECIPE.samples_per_prompt} per prompt), win 1 / tie 0.5 / loss 0 against the "
        "reference's samples for the same prompts and seeds.",
        "- *entropy*: mean per-token predictive entropy along the policy's own samples (nats). *feature MSE*: mean "
        "pooled-SAE-feature drift from the reference on held-out responses.",
        "- *held-out cache*: the same loss and metrics over all held-out pairs (a cache built with the training "
        f"cache's config), every {RECIPE.eval_every} steps and at the end, dashed in `plots/*.png`: "
        + "; ".join(f"{name} eval loss {s['evals'][0]['eval/loss']:.3f} (step {s['evals'][0]['step']}) → "
                    f"{s['evals'][-1]['eval/loss']:.3f} (step {s['evals'][-1]['step']}), reward accuracy "
                    f"{s['evals'][-1].get('eval/reward_accuracy', float('nan')):.3f}"
                    for name, s in stats.items() if s.get("evals")) + ".",
        "- Generations in AlpacaEval format: `eval/<method>/policy_outputs.json`; training curves: `plots/*.png`; "
        "logs: `logs/`.",
        "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "demo_out"), help="output directory (replaced)")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    a = p.parse_args(argv)
    losses = [x for x in a.losses.split(",") if x]
    out = Path(a.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():  # never delete a directory the demo did not make
            raise SystemExit(f"--out {out} exists, is not empty and is not a demo output directory; choose another")
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    (out / MARKER).write_text("written by python -m fpo_dist.demo; replaced by the next run\n")
    say(f"output directory: {out}")
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    timings, t_all = {}, time.time()

    t = time.time()
    data = task.write_preference_data(out / "data", seed=RECIPE.data_seed, n_train=RECIPE.n_train_pairs,
                                      n_heldout=RECIPE.n_heldout_pairs)
    say(f"task data: {RECIPE.n_train_pairs} training pairs, {RECIPE.n_heldout_pairs} held-out pairs in {out / 'data'}")
    store, eval_store = build_cache(data, out, manifest)
    timings["cache"] = time.time() - t

    runs = {}
    for loss in losses:
        t = time.time()
        runs[loss] = train(loss, store, eval_store, out, a.steps)
        timings[f"train {loss}"] = time.time() - t

    t = time.time()
    results = evaluate_all(runs, data, out, manifest)
    timings["evaluation"] = time.time() - t
    stats = {k: _train_stats(v) for k, v in runs.items()}
    plot_curves(stats, out)
    timings["total"] = time.time() - t_all
    report = write_report(results, stats, out, timings, a.steps)
    (out / "results.json").write_text(json.dumps(
        {"results": results, "train": {k: {kk: vv for kk, vv in v.items() if kk not in ("rows", "evals")}
                                       for k, v in stats.items()},
         "eval": {k: v["evals"] for k, v in stats.items()},
         "timings_s": timings}, indent=1))
    print()
    print(report.read_text())
    say(f"report: {report}")
    say(f"plots: {out / 'plots'}; generations (AlpacaEval format): {out / 'eval'}")
    fpo = results.get("fpo")
    if fpo is not None and fpo["win_rate"] <= 0.5:
        say(f"WARNING: FPO's judge win rate against the reference is {fpo['win_rate']:.3f}, not above 0.5")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
