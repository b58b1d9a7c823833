"""The embedded default: the whole pipeline on the bundled task, through the real entry points.

    python -m fpo_dist.demo [--out DIR] [--losses fpo,dpo,simpo,tdpo2] [--steps N] [--seeds N]

1. writes the task's train / held-out preference pairs (``fpo_dist.demo.task``);
2. starts a Ray head on loopback and builds the reference cache with ``ray job submit -- python -m fpo_dist.cache``
   from the bundled reference model and SAE (``fpo_dist/demo/assets``), and with the same config a second cache of
   the held-out pairs;
3. trains each method with ``deepspeed --num_gpus 2 launchers/train.py --deepspeed ds_configs/zero3.json`` (ZeRO-3;
   on a CPU machine 2 CPU ranks over gloo), evaluating on the held-out cache during training (``--eval_cache``);
4. evaluates every policy against the reference on held-out prompts (``fpo_dist.evaluate``: pairwise preference
   accuracy, the judge's win rate on sampled generations, generation entropy, feature drift) and reads step time
   and peak memory from the training logs;
5. writes ``report.md`` (a table per method, the latents that drift), PNG training curves and AlpacaEval-format
   generations into the output directory, whose path is printed at the start and the end.

Network: the demo needs none, and runs (Linux) in a private network namespace whose only interface is ``lo``
(``unshare --net``, or ``--net --map-root-user`` where unprivileged user namespaces are allowed), so that nothing it
starts can be reached from outside: the Ray head listens on 127.0.0.1 anyway (``ray_head``), but torch's rendezvous
store of the training runs (DeepSpeed's ``TCPStore``) listens on every interface and has no bind option.  Where no
namespace can be made, or with ``FPO_DEMO_NETNS=0``, it runs on the host's network and says what that exposes.

With ``--seeds N`` (N > 1) every method trains with training seeds 0..N-1 (the seed sets the data order; data,
reference and cache stay fixed) and the report gives each metric as the mean over seeds with a 95 % t-interval
over seeds, and paired differences between methods, Holm-adjusted (``fpo_dist.demo.stats``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fpo_dist.cache import LOCAL_RAY_ENV, LOOPBACK_NODE_IP
from fpo_dist.demo import report, task
from fpo_dist.demo.recipe import RECIPE

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).resolve().parent / "assets"
LOSSES = ("fpo", "dpo", "simpo", "tdpo2")
MARKER = ".fpo-demo-output"


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], log: Path, what: str, progress=None, env: dict | None = None) -> None:
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
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


def _cache_config(source: Path, store: Path, path: Path, manifest: dict, ref_topm: int = 0) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "model": {"name_or_path": str(ASSETS / "model")},
        "sae": {"source": str(ASSETS / "sae"), "layer": manifest["sae"]["hook_layer"]},
        "data": {"source": str(source), "max_length": RECIPE.max_length,
                 "max_prompt_length": RECIPE.max_prompt_length},
        "output": str(store), "workers": 2, "cpus_per_worker": 1, "device": "cpu",
        "rows_per_shard": 256, "chunk_rows": 128, "batch_size": 64, "overwrite": True,
        **({"ref_topm": ref_topm} if ref_topm else {}),
    }, indent=1))
    return path


def build_cache(data: dict[str, Path], out: Path, manifest: dict, ref_topm: int = 0) -> tuple[Path, Path]:
    """A Ray head on loopback (stopped by process group afterwards) and ``ray job submit`` of the cache job: the
    training cache, then the held-out cache with the same config (what ``--eval_cache`` expects); ``ref_topm``:
    also the reference's top-M distributions (offline TDPO)."""
    store, eval_store = out / "cache", out / "eval_cache"
    cfgs = [_cache_config(data["train"], store, out / "cache.yaml", manifest, ref_topm),
            _cache_config(data["heldout"], eval_store, out / "eval_cache.yaml", manifest, ref_topm)]
    ray_bin = str(Path(sys.executable).parent / "ray")
    with ray_head(out / "logs" / "ray_head.log") as (dash_url, env):
        for cfg, what in zip(cfgs, ("cache", "eval_cache")):
            _run([ray_bin, "job", "submit", "--address", dash_url, "--working-dir", str(ROOT),
                  "--", "python", "-m", "fpo_dist.cache", "--config", str(cfg)], out / "logs" / f"{what}.log",
                 f"{what.replace('_', ' ')} job (Ray, 2 CPU workers)", env=env)
    return store, eval_store


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 2, object_store_bytes: int = 128 << 20):
    """A Ray head that only this machine can reach, with Ray's token authentication on; yields ``(dashboard URL,
    environment for ray job submit)`` and stops the head by process group afterwards.

    Every server of the head listens on 127.0.0.1 only: node address 127.0.0.1 in Ray's single-node mode
    (``fpo_dist.cache.LOCAL_RAY_ENV``; why: ``fpo_dist/cache/__init__.py``), the dashboard on 127.0.0.1.  A plain
    ``ray start --head`` turns token authentication on only if a token already exists (``~/.ray/auth_token``), so
    the head is given a fresh token of its own: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (a 0600 file in
    the head's private temp dir), in the environment of the head and of ``ray job submit``; the job's driver
    inherits it from the head.  That temp dir is also the ``TMPDIR`` of every process of the head, the job and its
    actors, and is removed with what they left there once the head is stopped."""
    import secrets
    import urllib.request

    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="fpo-demo-ray-", dir="/tmp")  # 0700; short: AF_UNIX paths < 108 bytes
    token = secrets.token_hex(32)
    token_file = Path(ray_tmp) / "auth_token"
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(token)
    env = {**_env(), **LOCAL_RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "TMPDIR": ray_tmp}  # what the head's processes, the job and its actors leave goes with ray_tmp
    env.pop("RAY_AUTH_TOKEN", None)  # would take precedence over the file
    ray_bin = str(Path(sys.executable).parent / "ray")
    say(f"starting a Ray head on {LOOPBACK_NODE_IP}:{port} (dashboard 127.0.0.1:{dash}, {num_cpus} CPUs, "
        "loopback only, token authentication)")
    log_file = open(log, "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--node-ip-address={LOOPBACK_NODE_IP}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--dashboard-agent-listen-port=0",
         f"--num-cpus={num_cpus}", f"--temp-dir={ray_tmp}", "--include-dashboard=true", "--disable-usage-stats",
         f"--object-store-memory={object_store_bytes}"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_dashboard(dash, head, log, urllib.request.Request(
            f"http://127.0.0.1:{dash}/api/version", headers={"Authorization": f"Bearer {token}"}))
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_group(head)
        head.wait(timeout=30)
        log_file.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, request, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise SystemExit(f"the Ray head exited (code {head.returncode}); see {log}")
        try:
            urllib.request.urlopen(request, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the Ray dashboard (port {port}) did not come up within {timeout:.0f} s; see {log}")


def run_tag(loss: str, seed: int, n_seeds: int) -> str:
    """``fpo`` for a single-seed demo (its directories as always), ``fpo/seed_3`` with several seeds."""
    return loss if n_seeds == 1 else f"{loss}/seed_{seed}"


def train_args(loss: str, store: Path, run_dir: Path, steps: int, seed: int = 0, world: int = 2,
               loss_overrides: dict | None = None) -> list[str]:
    """The recipe's ``launchers/train.py`` arguments (``fpo_dist.trainer`` CLI) for ``loss`` on ``world`` ranks
    (global batch ``RECIPE.batch_pairs``); ``loss_overrides`` replace recipe values as ``--loss.<key> value``."""
    params = {"beta": RECIPE.beta_for(loss), "alpha": RECIPE.alpha, "k": RECIPE.k, "topk_mode": RECIPE.topk_mode,
              "gamma": RECIPE.simpo_gamma, **(loss_overrides or {})}
    args = ["--cache", str(store), "--output_dir", str(run_dir), "--loss.name", loss]
    for key, value in params.items():
        args += [f"--loss.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args + ["--optim.lr", str(RECIPE.lr), "--optim.warmup_steps", str(RECIPE.warmup_steps),
                   "--optim.grad_clip", str(RECIPE.grad_clip), "--micro_batch_size", str(RECIPE.batch_pairs // world),
                   "--grad_accum", "1", "--max_steps", str(steps), "--seed", str(seed), "--log_every", "1",
                   "--keep_last", "1"]


def train(loss: str, store: Path, out: Path, steps: int, seed: int = 0, tag: str | None = None,
          eval_store: Path | None = None) -> Path:
    tag = tag or loss
    run_dir = out / "runs" / tag
    evaluation = ["--eval_cache", str(eval_store), "--eval_every", str(RECIPE.eval_every)] if eval_store else []
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "launchers/train.py", "--deepspeed", "ds_configs/zero3.json",
           *train_args(loss, store, run_dir, steps, seed), *evaluation]
    t0 = time.time()
    seen = [0]

    def progress() -> None:
        path = run_dir / "metrics.jsonl"
        rows = [r for r in path.read_text().splitlines() if '"loss"' in r] if path.exists() else []
        if rows and len(rows) != seen[0]:
            seen[0] = len(rows)
            r = json.loads(rows[-1])
            extra = f", feature MSE (rejected) {r['feature_mse_rejected']:.2e}" if "feature_mse_rejected" in r else ""
            say(f"  {tag} step {r['step']}/{steps}: loss {r['loss']:.4f}, reward accuracy "
                f"{r['reward_accuracy']:.2f}, {r['step_time_s']:.2f} s/step{extra}")

    log = out / "logs" / f"train_{tag.replace('/', '_')}.log"
    _run(cmd, log, f"train {tag} (DeepSpeed ZeRO-3, 2 ranks, {steps} steps)", progress)
    say(f"train {tag}: {time.time() - t0:.0f} s")
    return run_dir


def evaluate_policy(policy: Path, heldout: Path, eval_dir: Path, manifest: dict, beta: float, kl: bool = False
                    ) -> dict:
    """``fpo_dist.evaluate`` of one policy against the bundled reference on the held-out pairs (with the task's
    judge, the recipe's sampling), plus the task's rule-follow rate of its samples; ``kl``: also ``kl_ref``, the KL
    to the reference per response token on the held-out responses (exact, over the vocabulary)."""
    from fpo_dist.config import DataConfig
    from fpo_dist.evaluate import GenerationConfig, evaluate

    data = DataConfig(source=str(heldout), max_length=RECIPE.max_length, max_prompt_length=RECIPE.max_prompt_length)
    gen = GenerationConfig(max_new_tokens=RECIPE.max_new_tokens, temperature=RECIPE.temperature, top_p=RECIPE.top_p,
                           seed=0, batch_size=64, samples_per_prompt=RECIPE.samples_per_prompt)
    m = evaluate(str(policy), data, reference_dir=str(ASSETS / "model"), sae_source=str(ASSETS / "sae"),
                 sae_layer=manifest["sae"]["hook_layer"], judge=task.pairwise_judge, generation=gen, beta=beta,
                 out_dir=eval_dir, kl=kl)
    outputs = json.loads((eval_dir / "policy_outputs.json").read_text())
    m["rule_follow"] = task.follow_rate([o["instruction"] for o in outputs], [o["output"] for o in outputs])
    return m


def evaluate_all(runs: dict[str, Path], data: dict[str, Path], out: Path, manifest: dict) -> dict[str, dict]:
    results = {}
    for name, policy in [("reference", ASSETS / "model")] + [(k, v / "hf") for k, v in runs.items()]:
        t0 = time.time()
        beta = RECIPE.beta_for(name.split("/")[0]) if name != "reference" else 0.1
        m = evaluate_policy(policy, data["heldout"], out / "eval" / name, manifest, beta)
        results[name] = m
        say(f"evaluated {name}: win rate vs reference {m['win_rate']:.3f}, rule-follow {m['rule_follow']:.3f} "
            f"({time.time() - t0:.0f} s)")
    return results


# --------------------------------------------------------------------------------------------- main


NETNS_ENV = "FPO_DEMO_NETNS"  # 0: the host's network; "inner": already in the demo's private namespace


def _enter_private_network(argv: list[str]) -> None:
    """Re-execute this demo (same pid) in a private network namespace, unless already there or FPO_DEMO_NETNS=0;
    where none can be made, warn once naming what listens on the host's network."""
    mode = os.environ.get(NETNS_ENV, "1")
    if mode == "inner":
        say("network: a private namespace (only lo): nothing the demo starts can be reached from outside")
        return
    from fpo_dist.netns import private_network_prefix

    prefix = private_network_prefix() if mode != "0" else None
    if prefix is not None:
        os.environ[NETNS_ENV] = "inner"
        sys.stdout.flush()
        os.execvp(prefix[0], [*prefix, sys.executable, "-m", "fpo_dist.demo", *argv])
    say("WARNING: network: the host's (" + ("FPO_DEMO_NETNS=0" if mode == "0" else "no private network namespace "
        "can be made here") + "): the Ray head listens on 127.0.0.1 only, but the training runs' rendezvous store "
        "(torch TCPStore, DeepSpeed) listens on every interface while they run")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line (python -m fpo_dist.demo): run where nothing else can reach it
        _enter_private_network(sys.argv[1:])
    p = argparse.ArgumentParser(prog="python -m fpo_dist.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "demo_out"), help="output directory (replaced)")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per method (0..N-1); N > 1 reports mean "
                   "and 95 %% t-interval over seeds")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
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
    for seed in range(a.seeds):
        for loss in losses:
            t = time.time()
            tag = run_tag(loss, seed, a.seeds)
            runs[tag] = train(loss, store, out, a.steps, seed, tag, eval_store)
            timings[f"train {loss}"] = timings.get(f"train {loss}", 0.0) + time.time() - t

    t = time.time()
    results = evaluate_all(runs, data, out, manifest)
    timings["evaluation"] = time.time() - t
    stats = {k: report.train_stats(v) for k, v in runs.items()}
    report.plot_curves({loss: stats[run_tag(loss, 0, a.seeds)] for loss in losses}, out)
    timings["total"] = time.time() - t_all
    if a.seeds == 1:
        path = report.write_report(results, stats, out, timings, a.steps, drift_dirs=_eval_dirs(out, losses, 1, 0))
        summary = {"results": results}
        fpo_win = results["fpo"]["win_rate"] if "fpo" in results else None
    else:
        path, summary = _multi_seed_report(results, stats, out, timings, a, losses)
        fpo_win = summary["statistics"]["intervals"].get("fpo", {}).get("win_rate", {}).get("mean")
    summary.update(train={k: {kk: vv for kk, vv in v.items() if kk not in ("rows", "evals")} for k, v in stats.items()},
                   eval={k: v["evals"] for k, v in stats.items()}, timings_s=timings)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print()
    print(path.read_text())
    say(f"report: {path}")
    say(f"plots: {out / 'plots'}; generations (AlpacaEval format): {out / 'eval'}")
    if fpo_win is not None and fpo_win <= 0.5:
        say(f"WARNING: FPO's judge win rate against the reference is {fpo_win:.3f}, not above 0.5")
        return 1
    return 0


def _eval_dirs(out: Path, losses: list[str], n_seeds: int, seed: int) -> dict[str, Path]:
    """The trained methods' evaluation directories of one seed (the drift section's input)."""
    return {loss: out / "eval" / run_tag(loss, seed, n_seeds) for loss in losses}


def _multi_seed_report(results: dict, stats: dict, out: Path, timings: dict, a, losses: list[str]):
    from fpo_dist import drift

    seeds = range(a.seeds)
    dirs = {"reference": [out / "eval" / "reference"],
            **{loss: [out / "eval" / run_tag(loss, s, a.seeds) for s in seeds] for loss in losses}}
    ci = report.seed_statistics(dirs)
    report.plot_intervals(ci, out)
    overlaps = {}
    if "fpo" in losses:  # each seed's top set against FPO's of the same seed
        for loss in losses:
            overlaps[loss] = [drift.overlap(drift.top_ids(drift.read_drift(dirs[loss][s] / "drift.json")),
                                            drift.top_ids(drift.read_drift(dirs["fpo"][s] / "drift.json")))
                              for s in seeds]
    per_loss_stats = {loss: [stats[run_tag(loss, s, a.seeds)] for s in seeds] for loss in losses}
    path = report.write_multi_seed_report(ci, per_loss_stats, out, timings, a.steps,
                                          _eval_dirs(out, losses, a.seeds, 0), overlaps)
    return path, {"results": results, "statistics": ci, "drift_overlap_with_fpo": overlaps}


if __name__ == "__main__":
    sys.exit(main())
