"""``python -m fpo_dist.cache`` — build, verify or describe a reference cache.

    python -m fpo_dist.cache --config cache.yaml [--section.key value ...]     # build / resume
    python -m fpo_dist.cache verify STORE [--recompute N] [--device cpu]      # checksums, completeness
    python -m fpo_dist.cache info STORE [--json]                              # provenance, counts, sizes

STORE may be an fsspec URL (``s3://bucket/cache``); fsspec's options (all three commands) come from
``--storage_options @creds.json`` (a JSON file, e.g. ``{"endpoint_url": "http://127.0.0.1:9000", "key": "...",
"secret": "..."}``; ``storage_options: "@creds.json"`` in the build's YAML), else the ``FPO_STORAGE_OPTIONS``
environment variable (JSON, or the file's path).  Inline ``--storage_options '{…}'`` is for options that are not
secret: a credential there is refused (fpo_dist/storage_options.py).

Under ``ray job submit … -- python -m fpo_dist.cache …`` the job attaches to that cluster (RAY_ADDRESS);
plain runs start a local Ray instance.  Exit status: 0 ok, 1 failure, 2 bad configuration/input.
"""

from __future__ import annotations

import argparse
import json
import sys

from fpo_dist.storage_options import mask_text  # error lines never show URL userinfo or a credential


def _build(argv: list[str]) -> int:
    from fpo_dist.config import CacheConfig, ConfigError, load_config, split_config_args
    from fpo_dist.data import DataError

    path, overrides = split_config_args(argv)
    try:
        cfg = load_config(CacheConfig, path, overrides)
    except ConfigError as e:
        print(f"configuration error: {mask_text(str(e))}", file=sys.stderr)
        return 2
    from fpo_dist.cache.driver import CacheJobError, run_cache_job
    from fpo_dist.resolve import ResolveError
    from fpo_dist.store import StoreError

    try:
        run_cache_job(cfg)
    except (DataError, StoreError, ResolveError) as e:
        print(f"error: {mask_text(str(e))}", file=sys.stderr)
        return 2
    except CacheJobError as e:
        print(f"cache job failed: {mask_text(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:
        import errno

        if e.errno != errno.ENOSPC:
            raise
        print(f"cache job failed: no space left while writing {mask_text(cfg.output)} ({e}); free space there and rerun: "
              "committed shards are kept", file=sys.stderr)
        return 1
    return 0


def _store_command(run):
    """Run ``run(argv)``; an unreadable store (any :class:`~fpo_dist.store.StoreError`) or bad storage options
    print one line and exit 2."""

    def command(argv: list[str]) -> int:
        from fpo_dist.config import ConfigError
        from fpo_dist.store import StoreError

        try:
            return run(argv)
        except (StoreError, ConfigError) as e:
            print(f"error: {mask_text(str(e))}", file=sys.stderr)
            return 2

    return command


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage_options", "--storage-options", default="{}", metavar="@FILE|JSON",
                   help="fsspec options for a STORE URL: @path of a JSON file (credentials: key, secret, ...), or "
                   "inline JSON without secrets (e.g. endpoint_url); default: $FPO_STORAGE_OPTIONS")


def _open(path: str, storage_options: str = "{}"):
    from fpo_dist.config import parse_storage_options
    from fpo_dist.store import open_store

    return open_store(path, storage_options=parse_storage_options(storage_options, {"STORE": path}))


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.cache verify")
    p.add_argument("store")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="also recompute N sampled rows with the provenance's model + SAE and compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--atol-logp", type=float, default=None,
                   help="per-token average log-prob tolerance (default 1e-3, as the trainer's step-0 check; 3e-2 for "
                   "bf16/fp16 caches)")
    p.add_argument("--rtol-mse", type=float, default=None, help="pooled-feature MSE tolerance, relative to the "
                   "mean square of the cached vector (default 1e-4, as the trainer's step-0 check; 1e-2 for bf16/fp16 caches)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model's own code (never taken from the store)")
    _add_storage_options(p)
    a = p.parse_args(argv)
    store = _open(a.store, a.storage_options)
    problems = store.verify()
    for line in problems:
        print(f"PROBLEM {line}")
    if a.recompute and not problems:
        cmp = _recompute(store, a.recompute, a.device, a.trust_remote_code)
        print(f"recomputed {cmp.describe()}")
        half = store.provenance["model"].get("dtype") in ("bfloat16", "float16")
        # fp32: the step-0 check's defaults, from the rounding rule for another machine's kernels (fpo_dist.consistency)
        atol = a.atol_logp if a.atol_logp is not None else (3e-2 if half else 1e-3)
        rtol = a.rtol_mse if a.rtol_mse is not None else (1e-2 if half else 1e-4)
        if not cmp.ok(atol, rtol):
            problems.append("recomputed rows differ from the cache")
            print("PROBLEM recomputed rows differ from the cache beyond tolerance")
    print("verify: OK" if not problems else f"verify: {len(problems)} problem(s)")
    return 0 if not problems else 1


def _recompute(store, n: int, device: str, trust_remote_code: bool):
    import numpy as np

    from fpo_dist.cache.verify import recompute_rows
    from fpo_dist.cache.worker import resolve_device
    from fpo_dist.config import ModelConfig
    from fpo_dist.models import load_causal_lm, load_tokenizer, model_spec, pad_token_id, tokenizer_spec
    from fpo_dist.sae import load_sae

    prov = store.provenance
    mcfg = ModelConfig.from_provenance(prov, trust_remote_code)
    dev = resolve_device(device)
    tok = load_tokenizer(tokenizer_spec(mcfg))
    layout = prov.get("batch_layout", "padded")  # stores from before packing: padded
    model = load_causal_lm(model_spec(mcfg), device=dev, varlen=layout != "padded" and prov.get("attention_kernel", "sdpa"))
    sae = load_sae(prov["sae"]["source"], prov["sae"]["sae_id"], device=dev)
    ok_rows = store.ok_rows()
    rows = sorted(np.random.default_rng(0).choice(ok_rows, size=min(n, len(ok_rows)), replace=False).tolist())
    pad = pad_token_id(tok)
    return recompute_rows(store, model, sae, prov["sae"]["layer"], rows, pad, batch_size=prov.get("batch_size", 8),
                          layout=layout)


def _info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.cache info")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print the full info as JSON")
    _add_storage_options(p)
    a = p.parse_args(argv)
    store = _open(a.store, a.storage_options)
    info = store.info()
    info["token_extras"] = store.token_extras_info()
    info["path"] = mask_text(info["path"])
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    prov = info["provenance"]
    rows = info["rows"]
    print(f"store: {info['path']}  (complete: {info['complete']}, finalized {info['finalized_at']})")
    print(f"model: {prov['model']['name_or_path']} [{prov['model']['dtype']}]  sae: {prov['sae']['source']} "
          f"{prov['sae'].get('sae_id') or ''} at {prov['hook']}")
    print(f"data: {prov['data']['source']} ({prov['data']['schema']}, template {prov['data']['template']}, "
          f"max_length {prov['data']['max_length']}, max_prompt_length {prov['data']['max_prompt_length']})")
    print(f"shards: {info['shards']['committed']} committed, {info['shards']['pending']} pending")
    print(f"rows: {rows['total']} total, {rows['ok']} ok, {rows['not_written']} not written")
    for reason, n in sorted(rows["bad"].items()):
        print(f"  bad: {reason}: {n}")
    for b in store.bad_rows()[:20]:
        print(f"    row {b.index}: field {b.field}: {b.reason}: {b.detail}")
    bpr = info["bytes_per_response"]
    print(f"size on disk: {info['size_bytes'] / 1e6:.3f} MB; bytes per response: {bpr:.0f}" if bpr else
          f"size on disk: {info['size_bytes'] / 1e6:.3f} MB")
    nz = info["pooled_nnz"]
    print(f"non-zeros per pooled vector: mean {nz['mean']:.1f}, median {nz['median']:.0f}, max {nz['max']}")
    for line in _extras_lines(store, info["token_extras"]):
        print(line)
    return 0


def _extras_lines(store, extras) -> list[str]:
    """``info`` lines on the per-token extras: present or not, their sizes, and one row read back."""
    if extras is None:
        return ["per-token extras: none (built without per_token_logps / per_token_codes)"]
    lp, codes, topm = extras["token_logps"], extras["token_codes"], extras["ref_topm"]
    lines = [f"per-token log-probs: {lp['values']} values, {lp['bytes'] / 1e6:.3f} MB" if lp else
             "per-token log-probs: none (built without per_token_logps)",
             f"per-token SAE codes: {codes['tokens']} tokens, {codes['nnz']} non-zeros, {codes['bytes'] / 1e6:.3f} MB"
             if codes else "per-token SAE codes: none (built without per_token_codes)",
             f"reference top-{topm['m']} distributions: {topm['tokens']} tokens, {topm['bytes'] / 1e6:.3f} MB, "
             f"{topm['bytes'] / max(1, topm['tokens']):.0f} bytes per response token" if topm else
             "reference top-M distributions: none (built without --ref_topm)"]
    import numpy as np

    ok = store.ok_rows()
    ok = ok[np.isin(store.plan.shard_of(ok), store.committed_shards())]
    if len(ok):
        ex = store.read_token_extras(ok[:1])
        sample = f"  row {ok[0]}: chosen {ex.n_tokens[0, 0]} tokens, rejected {ex.n_tokens[0, 1]}"
        if ex.chosen_token_logps is not None and len(ex.chosen_token_logps[0]):
            sample += f"; chosen mean token log-prob {float(np.mean(ex.chosen_token_logps[0])):.3f}"
        if ex.chosen_token_codes is not None:
            sample += f"; chosen code non-zeros {len(ex.chosen_token_codes[0].indices)}"
        lines.append(sample)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("verify", "info"):
        return _store_command({"verify": _verify, "info": _info}[argv[0]])(argv[1:])
    if argv and argv[0] == "build":
        argv = argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return _build(argv)


if __name__ == "__main__":
    sys.exit(main())
