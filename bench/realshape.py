"""The real shape (issue 12, part 4): Gemma 3 270M (real weights), the real JumpReLU SAE on block 9 (``make
real-sae``; a calibrated random 16k one as a contrast run, issue 21) and UltraFeedback-like lengths
(``presets.py``: ``realshape`` on CPU, ``realshape-gpu`` on a GPU), side by side in one run:

- cache: ``reference_pass`` (the worker's default path: output layer at selected positions, packed rows) vs a bare
  transformers forward (full logits, padded batches) over the same rows, 1 thread on CPU; then the real Ray cache
  job (1 worker) builds the store the training runs read;
- training (real trainer, ZeRO-3, ``train_rounds`` launches each interleaved ABC CBA, same store, batch and seed):
  ``fpo`` (the defaults: selected logits, shared-prefix rows), ``fpo-packed`` (``--batch_layout packed``: the
  prompt computed once per sequence, the layout sharing replaces), ``fpo-materialized`` (``--logits materialized
  --batch_layout padded``: full logits and padding, what the authors' code and TRL's default do) and ``dpo-online``
  (a resident ZeRO-3 reference, on the new paths too); then ``fpo-random-sae``: fpo with the calibrated random SAE of Gemma Scope 2's width on a cache
  built with it (the real SAE is 4k wide: what the width costs).

Memory on CPU is peak RSS per rank; each memory ratio is also given above the post-setup baseline (a rank's RSS
after ``Trainer.setup`` — weights, optimizer state, resident reference / SAE, imports — before its first step),
and the targets are judged on that.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

LOSSES = ("fpo", "fpo-packed", "fpo-materialized", "dpo-online")
CONTRAST = "fpo-random-sae"  # fpo with the calibrated random SAE (Gemma Scope 2's width) beside the real one


def run(sizes, device: str, root: Path, nproc: int, log=print, rerun_loaded: bool = True) -> dict:
    """``rerun_loaded``: a training launch measured while other processes kept more than 0.25 cores busy is run
    once more at the end and the quieter attempt kept (adds ~3-6 min per such launch on a shared 2-core host)."""
    from bench import assets as bench_assets
    from bench import cache as bench_cache
    from bench import train as bench_train
    from bench.report import measure_quietly

    a = bench_assets.build_realshape_assets(root / "assets", sizes, device, log)
    threads = 1 if device == "cpu" else None  # a CPU cache worker runs cpus_per_worker=1 threads
    compute, load, loads = measure_quietly(
        lambda _: bench_cache.bench_reference_pass(a, sizes, device, threads, log),
        "realshape cache: reference_pass vs bare forward", log, retry=False)  # ~1 min; its ratio is ~2x the target
    compute.update(host_load=load, host_loads=loads)
    job = bench_cache.bench_cache_job(a, sizes, device, [1], root / "cache", retry=False, log=log)
    train = bench_train.run(job["store"], sizes, nproc, device, root / "train", list(LOSSES),
                            rerun_loaded=rerun_loaded, log=log, keep_going=True, rounds=sizes.train_rounds)
    if a.contrast_sae_dir is not None:  # FPO once more with the calibrated random SAE, on a cache of its own
        contrast = dataclasses.replace(a, sae_dir=a.contrast_sae_dir)
        cjob = bench_cache.bench_cache_job(contrast, sizes, device, [1], root / "cache-contrast", retry=False, log=log)
        ctrain = bench_train.run(cjob["store"], sizes, nproc, device, root / "train-contrast", ["fpo"],
                                 rerun_loaded=rerun_loaded, log=log, keep_going=True)
        if "fpo" in ctrain["losses"]:
            train["losses"][CONTRAST] = {**ctrain["losses"]["fpo"], "loss": CONTRAST}
        train.setdefault("failed", {}).update({CONTRAST: t for t in ctrain.get("failed", {}).values()})
    return {"sizes": sizes.to_dict(), "assets": a.to_dict(), "train": train,
            "cache": {"compute": compute, "job": job, "ratio_reference_pass_vs_bare": compute["ratio"],
                      "ratio_worker_vs_bare": job["runs"][0]["mean_worker_tokens_per_s"] / compute["bare_tokens_per_s"]},
            "batch_layout_available": bench_train.has_batch_layout()}


def ratios(rs: dict | None) -> dict:
    """The real-shape ratios (None where a run is missing)."""
    keys = ("realshape_mem_fpo_vs_materialized", "realshape_mem_fpo_vs_materialized_measured",
            "realshape_time_fpo_vs_materialized", "realshape_cpu_fpo_vs_materialized",
            "realshape_time_fpo_vs_dpo_online", "realshape_cpu_fpo_vs_dpo_online",
            "realshape_mem_fpo_vs_dpo_online", "realshape_mem_fpo_vs_dpo_online_measured",
            "realshape_cache_vs_bare_forward", "realshape_cache_vs_bare_forward_cpu",
            "realshape_cache_job_worker_vs_bare_forward", "realshape_padding_share",
            "realshape_padding_share_materialized", "realshape_time_fpo_random_sae_vs_real",
            "realshape_mem_fpo_random_sae_vs_real_measured", "realshape_time_fpo_shared_vs_packed",
            "realshape_cpu_fpo_shared_vs_packed", "realshape_mem_fpo_shared_vs_packed_measured",
            "realshape_cache_shared_vs_packed") + tuple(k + "_interval" for k in TIME_PAIRS)
    out = dict.fromkeys(keys)
    if not rs:
        return out
    t = (rs.get("train") or {}).get("losses", {})

    def r(a, b, key):
        return t[a][key] / t[b][key] if a in t and b in t and t[a].get(key) and t[b].get(key) else None

    out.update(
        realshape_mem_fpo_vs_materialized=r("fpo", "fpo-materialized", "peak_above_setup_mb"),
        realshape_mem_fpo_vs_materialized_measured=r("fpo", "fpo-materialized", "peak_memory_mb"),
        realshape_time_fpo_vs_materialized=r("fpo", "fpo-materialized", "step_time_s"),
        realshape_cpu_fpo_vs_materialized=r("fpo", "fpo-materialized", "cpu_s_per_step"),
        realshape_time_fpo_vs_dpo_online=r("fpo", "dpo-online", "step_time_s"),
        realshape_cpu_fpo_vs_dpo_online=r("fpo", "dpo-online", "cpu_s_per_step"),
        realshape_mem_fpo_vs_dpo_online=r("fpo", "dpo-online", "peak_above_setup_mb"),
        realshape_mem_fpo_vs_dpo_online_measured=r("fpo", "dpo-online", "peak_memory_mb"),
        realshape_time_fpo_random_sae_vs_real=r(CONTRAST, "fpo", "step_time_s"),
        realshape_mem_fpo_random_sae_vs_real_measured=r(CONTRAST, "fpo", "peak_memory_mb"),
        realshape_time_fpo_shared_vs_packed=r("fpo", "fpo-packed", "step_time_s"),
        realshape_cpu_fpo_shared_vs_packed=r("fpo", "fpo-packed", "cpu_s_per_step"),
        realshape_mem_fpo_shared_vs_packed_measured=r("fpo", "fpo-packed", "peak_memory_mb"),
    )
    for key, (a, b) in TIME_PAIRS.items():
        out[key + "_interval"] = paired_ratio_interval(t.get(a), t.get(b))
    cache = rs.get("cache")
    if cache:
        out.update(realshape_cache_vs_bare_forward=cache["ratio_reference_pass_vs_bare"],
                   realshape_cache_vs_bare_forward_cpu=cache["compute"].get("ratio_cpu"),
                   realshape_cache_job_worker_vs_bare_forward=cache["ratio_worker_vs_bare"],
                   realshape_cache_shared_vs_packed=cache["compute"].get("ratio_shared_vs_packed"))
    for name, key in (("fpo", "realshape_padding_share"), ("fpo-materialized", "realshape_padding_share_materialized")):
        pad = (t.get(name) or {}).get("padding")
        out[key] = pad["share"] if pad else None
    return out


# step-time ratio keys and their runs: each also gets ``<key>_interval`` from the per-step ratios (paired by step)
TIME_PAIRS = {"realshape_time_fpo_vs_materialized": ("fpo", "fpo-materialized"),
              "realshape_time_fpo_vs_dpo_online": ("fpo", "dpo-online"),
              "realshape_time_fpo_shared_vs_packed": ("fpo", "fpo-packed")}


def paired_ratio_interval(a: dict | None, b: dict | None) -> dict | None:
    """The 95 % t-interval of the geometric mean of the per-step time ratios ``a / b``, step ``i`` of both runs
    being on the same pairs (the same store, seed and batch): ``{"mean", "lo", "hi", "n"}`` on the ratio scale
    (exp of the interval of the log-ratios); None with fewer than 2 steps in common."""
    import math

    from fpo_dist.demo.stats import t_interval

    ta, tb = (a or {}).get("step_times_s") or [], (b or {}).get("step_times_s") or []
    logs = [math.log(x / y) for x, y in zip(ta, tb) if x > 0 and y > 0]
    if len(logs) < 2:
        return None
    iv = t_interval(logs)
    return {"mean": math.exp(iv.mean), "lo": math.exp(iv.lo), "hi": math.exp(iv.hi), "n": iv.n}


# (ratio key, what, comparison, threshold, the ratio as measured / in CPU seconds shown next to it)
TARGETS = (
    ("realshape_mem_fpo_vs_materialized", "real shape: fpo / fpo with materialized logits + padding, peak memory "
     "per rank above the post-setup baseline", "<=", 0.6),
    ("realshape_time_fpo_vs_materialized", "real shape: fpo / fpo with materialized logits + padding, step time",
     "<=", 0.8),
    ("realshape_time_fpo_vs_dpo_online", "real shape: fpo / dpo-online (resident ZeRO-3 reference), step time, "
     "both on the new paths", "<=", 0.78),
    ("realshape_cache_vs_bare_forward", "real shape: cache reference_pass / bare transformers forward (full logits, "
     "padded) tokens/s per worker", ">=", 1.15),
    ("realshape_padding_share", "real shape: padding / computed tokens in fpo's training micro-batches", "<=", 0.02),
    ("realshape_time_fpo_shared_vs_packed", "real shape: fpo with the prompt shared / packed (prompt once per "
     "sequence), step time", "<=", 0.85),
    ("realshape_cache_shared_vs_packed", "real shape: cache reference_pass shared / packed, time per pass over the "
     "same pairs", "<=", 0.85),
)
SECOND_VALUE = {"realshape_mem_fpo_vs_materialized": "realshape_mem_fpo_vs_materialized_measured",
                "realshape_time_fpo_vs_materialized": "realshape_cpu_fpo_vs_materialized",
                "realshape_time_fpo_vs_dpo_online": "realshape_cpu_fpo_vs_dpo_online",
                "realshape_cache_vs_bare_forward": "realshape_cache_vs_bare_forward_cpu",
                "realshape_time_fpo_shared_vs_packed": "realshape_cpu_fpo_shared_vs_packed"}


def _f(x, fmt=".3f"):
    return "—" if x is None else format(x, fmt)


def shape_text(rs: dict) -> str:
    """The stated shape: model, SAE, length distributions and the lengths measured."""
    s, a = rs["sizes"], rs["assets"]
    m, L = a.get("model") or {}, a.get("lengths") or {}
    p_spec, r_spec = s["prompt_tokens"], s["response_tokens"]

    def dist(spec):
        med, sig, lo, hi = spec
        return f"log-normal, median {med:g}, σ {sig:g} (of the log), clipped to [{lo}, {hi}]"

    def got(k):
        x = L.get(k) or {}
        return (f"median {x.get('median', 0):.0f}, 10th–90th percentile {x.get('p10', 0):.0f}–{x.get('p90', 0):.0f}, "
                f"range {x.get('min')}–{x.get('max')}")

    corr = L.get("chosen_rejected_correlation")
    return (f"Model: {m.get('name', 'Gemma 3 270M')}, {a['n_params'] / 1e6:.0f} M parameters, {m.get('blocks')} blocks, "
            f"d_model {m.get('d_model')}, vocabulary {m.get('vocab')}, tied head; {s['dtype']}. {sae_text(rs)} Data: "
            f"{s['rows']} rows of real English prose (standard-library docstrings) cut to drawn token lengths — "
            f"prompt: {dist(p_spec)}; each response (chosen and rejected drawn independently): {dist(r_spec)}. "
            f"Measured after the data pipeline (plain template, EOS): prompt {got('prompt')}; responses "
            f"{got('response')} (longest / shortest {L.get('response_max_over_min', 0):.1f}×); chosen–rejected length "
            f"correlation {_f(corr, '.2f')}. Micro-batch {s['micro_batch']} pair(s) per rank, max length "
            f"{s['max_length']} (prompt ≤ {s['max_prompt_length']}).")


def sae_text(rs: dict) -> str:
    """What the SAE is: the real one (with the random contrast, if run) or a calibrated random one."""
    s, a = rs["sizes"], rs["assets"]
    model = a.get("model") or {}
    d, cal = model.get("d_model"), model.get("calibration_tokens")

    def calibrated(width, l0):
        return (f"a random JumpReLU {d}×{width} on block {s['hook_layer']} calibrated with "
                f"`fpo_dist.testing.calibrate_jumprelu_sae` on {cal} tokens of {s['calibration_rows']} held-out rows "
                f"to a per-token L0 of {l0:.0f}")

    if a.get("sae_kind") != "real":
        return f"SAE: {calibrated(s['d_sae'], a['calibrated_l0'])}."
    text = (f"SAE: the JumpReLU SAE {d}×{s['d_sae']} on block {s['hook_layer']} that `make real-sae` trains with "
            f"sae-lens (`docs/results/real-sae`, per-token L0 {a['calibrated_l0']:.0f} on held-out text).")
    if a.get("contrast_l0") is not None:
        text += (f" Contrast (`{CONTRAST}`): FPO with {calibrated(a['contrast_d_sae'], a['contrast_l0'])} — Gemma "
                 "Scope 2's width for this model — on a cache built with it.")
    return text


def markdown(rs: dict | None, rat: dict, device: str, cores: int | None = None) -> list[str]:
    if not rs:
        return []
    from bench.report import load_note
    from bench.train import launch_order

    tr, cache = rs.get("train") or {}, rs.get("cache") or {}
    losses = tr.get("losses", {})
    unit = "allocated" if device == "cuda" else "RSS"
    real = (rs.get("assets") or {}).get("sae_kind") == "real"
    title = f"Gemma 3 270M + the real {rs['sizes']['d_sae'] // 1024}k SAE" if real else \
        f"Gemma 3 270M + {rs['sizes']['d_sae'] // 1024}k SAE"
    lines = [f"## Real shape: {title}", "", shape_text(rs), "",
             f"| target | measured | threshold | | {'as measured (peak, baseline included)' if device == 'cpu' else 'peak'}"
             " / in CPU seconds |", "|---|---:|---:|---|---|"]
    from bench.report import PER_STEP_NOTE, check_targets_of, target_row

    lines += [target_row(t, rat) for t in check_targets_of(rat, TARGETS, SECOND_VALUE)]
    lines += ["", f"Memory targets are judged above the post-setup baseline: per rank, the training steps' peak {unit} "
                  f"minus that rank's {unit} after `Trainer.setup` and before the first step (weights, optimizer state, "
                  "resident reference or SAE" + (", and the ~0.5 GB of the process's imports" if device == "cpu" else "")
                  + "), max over ranks; the last column gives the same ratio on the peaks as measured. Time targets "
                  f"are judged on wall-clock step time (median over the measured steps); {PER_STEP_NOTE}; the last "
                  "column gives the same ratio in CPU seconds of the ranks.", ""]
    if losses:
        lines += [f"| run | logits | layout | step time (s), median [min] | CPU s/step | peak {unit} (MB/rank) | "
                  f"after setup (MB) | peak − after setup (MB) | padding share | host load (cores) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        from bench.report import _peak_rank

        for n, r in losses.items():
            mem = _peak_rank(r)
            key = "allocated_mb" if "allocated_mb" in mem["after_setup"] else "rss_mb"
            pad = r.get("padding") or {}
            lines.append(f"| {n} | {r.get('logits')} | {r.get('batch_layout')} | {r['step_time_s']:.2f} "
                         f"[{r['min_step_time_s']:.2f}] | {_f(r.get('cpu_s_per_step'), '.1f')} | "
                         f"{r['peak_memory_mb']:.0f} | {r.get('after_setup_mb') or mem['after_setup'][key]:.0f} | "
                         f"{_f(r.get('peak_above_setup_mb'), '.0f')} | {_f(pad.get('share'), '.3f')} | "
                         f"{_f((r.get('host_load') or {}).get('others_cores'), '.2f')} |")
        if CONTRAST in losses:
            lines += ["", f"The SAE's width: `{CONTRAST}` / `fpo` (random {rs['assets']['contrast_d_sae']}-wide SAE / the "
                          f"real {rs['sizes']['d_sae']}-wide one): step time "
                          f"{_f(rat.get('realshape_time_fpo_random_sae_vs_real'))}, peak memory as measured "
                          f"{_f(rat.get('realshape_mem_fpo_random_sae_vs_real_measured'))}."]
        rounds = tr.get("rounds", 1)
        lines += ["", f"{tr['nproc']} rank(s), `{tr['ds_config']}`, steps {rs['sizes']['warmup_steps'] + 1}–"
                      f"{rs['sizes']['warmup_steps'] + rs['sizes']['measure_steps']} measured (first "
                      f"{rs['sizes']['warmup_steps']} skipped)"
                      + (f" in each of {rounds} launches per run, interleaved "
                         f"{' '.join(n for _, n in launch_order(LOSSES, rounds))} (the runs forwards, then backwards) so "
                         "that a drift of the host's speed falls on both sides of each ratio; the rounds' steps pooled "
                         "(step i of round k paired with the other runs' step i of round k), CPU seconds and memory the "
                         "median over rounds" if rounds > 1 else "")
                      + ". Padding share: padding positions / computed positions "
                      "of every micro-batch the run's trainer was handed (counted from the micro-batches).", ""]
        from bench.report import _phase_memory_table, _phase_table

        phases = _phase_table(losses)
        if phases:
            lines += ["Where the time goes (one extra profiled step, rank 0; phases timed by wrapping the trainer's "
                      "building blocks, `other` = the rest of the step):", ""]
            lines += phases + ["", "Memory by phase (profiled step, rank 0: how far each phase pushed memory above "
                                   "where it started; on CPU a lower bound of its transient allocations):", ""]
            lines += _phase_memory_table(losses, unit) + [""]
        for n, tail in (tr.get("failed") or {}).items():
            oom = "SIGKILL" in tail or "Signal 9" in tail or "exitcode: -9" in tail
            lines += [f"**{n} failed twice**" + (" (killed by SIGKILL: the kernel's OOM killer on a host whose memory "
                                                  "other processes shared)" if oom else "") + ": see the JSON's "
                      "`realshape.train.failed`.", ""]
        if not rs.get("batch_layout_available", True):
            lines += ["**This trainer has no `batch_layout` switch yet: every run above is padded.**", ""]
    comp = cache.get("compute")
    if comp:
        lines += [f"Cache: `reference_pass` ({', '.join(f'{k}={v}' for k, v in comp['reference_pass_kwargs'].items()) or 'defaults'}) "
                  f"{comp['reference_pass_tokens_per_s']:.0f} tokens/s vs bare forward {comp['bare_tokens_per_s']:.0f} "
                  f"tokens/s on {comp['pairs']} pairs ({comp['tokens']} tokens; the bare forward computes "
                  f"{comp['padded_tokens']} padded positions in {comp['batches']} batches of {comp['batch_pairs']} "
                  f"pairs), {comp['threads']} thread(s), {len(comp['bare_s'])} interleaved round(s); "
                  f"{load_note(comp.get('host_load'), cores, comp.get('host_loads'))}. The Ray cache job (1 worker, "
                  f"tokenize + pass + write): {cache['job']['runs'][0]['mean_worker_tokens_per_s']:.0f} tokens/s per "
                  f"worker ({_f(rat.get('realshape_cache_job_worker_vs_bare_forward'))} of the bare forward; its "
                  "start-up is amortised over a few shards only). Inside one `reference_pass` call (s): " + ", ".join(
                      f"{k} {v:.2f}" for k, v in comp["reference_pass_parts_s"].items()) + " (`_response_logps`: "
                  "the decoder, the output layer at the selected positions and the log-probs; `_pooled_codes`: SAE "
                  "encode + pooling).", ""]
        if comp.get("ratio_shared_vs_packed") is not None:
            ct = comp["computed_tokens"]
            lines[-1:-1] = [f"Prefix sharing in the cache pass: shared / packed time per pass "
                            f"{comp['ratio_shared_vs_packed']:.3f} (median over the {len(comp['packed_s'])} rounds); "
                            f"positions computed {ct['shared']} / {ct['packed']} = {ct['shared'] / ct['packed']:.3f} "
                            "(the prompt once per pair instead of twice)."]
    return lines
