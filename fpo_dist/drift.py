"""The SAE latents that drift: which features of a trained policy moved most from the reference's.

Contract:

- Input: the mean pooled SAE activation of every latent over the same held-out responses, once under the
  reference and once under the policy (``c̄`` as everywhere in the project: the block-ℓ residual output encoded
  by the frozen SAE, mean over the positions that predict response tokens; then the mean over responses, chosen
  and rejected alike).  :func:`fpo_dist.evaluate.score_pairs` accumulates both.
- ``change = policy mean − reference mean`` per latent; a latent's drift is ``|change|``.  :func:`drift_table`
  lists the ``top`` latents by drift, largest first (ties: lower id first), with ``id``, ``reference_mean``,
  ``policy_mean`` and ``change``.  Ids are the SAE's feature indices, so for a Gemma Scope SAE they are the
  indices Neuronpedia uses (:func:`neuronpedia_url`).
- :func:`overlap` compares two runs' top drifting sets: ``|A ∩ B| / |B|`` — the share of ``B``'s (e.g. FPO's)
  top latents that ``A`` also has in its top set.

``fpo_dist.evaluate`` writes ``drift.json`` (:func:`write_drift`) and ``drift.png`` (:func:`plot_drift`) for every
run it scores with an SAE; the demo compares methods with :func:`overlap` and :func:`plot_drift_comparison`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

DEFAULT_TOP = 20


def drift_table(reference_mean: torch.Tensor, policy_mean: torch.Tensor, top: int = DEFAULT_TOP) -> list[dict]:
    """The ``top`` latents whose mean pooled activation moved most (``|policy − reference|``), largest first.

    Each row: ``{"id", "reference_mean", "policy_mean", "change"}`` with ``change = policy − reference``.  Latents
    that did not move at all are never listed (so fewer than ``top`` rows when fewer moved).
    """
    ref = torch.as_tensor(reference_mean, dtype=torch.float64).flatten()
    pol = torch.as_tensor(policy_mean, dtype=torch.float64).flatten()
    if ref.shape != pol.shape:
        raise ValueError(f"reference and policy means must cover the same latents: {ref.numel()} vs {pol.numel()}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    change = pol - ref
    ids = torch.arange(change.numel())
    # stable sort on -|change|: equal drifts keep ascending id order
    order = torch.sort(-change.abs(), stable=True).indices
    rows = []
    for i in order[:top].tolist():
        if change[i] == 0:
            break
        rows.append({"id": int(ids[i]), "reference_mean": ref[i].item(), "policy_mean": pol[i].item(),
                     "change": change[i].item()})
    return rows


def top_ids(rows: Sequence[Mapping]) -> list[int]:
    return [int(r["id"]) for r in rows]


def overlap(ids: Sequence[int], baseline: Sequence[int]) -> float:
    """``|ids ∩ baseline| / |baseline|``: the share of ``baseline``'s top latents that ``ids`` also lists."""
    base = {int(i) for i in baseline}
    if not base:
        return float("nan")
    return len(base & {int(i) for i in ids}) / len(base)


def neuronpedia_url(neuronpedia_id: str | None, latent: int) -> str | None:
    """``https://www.neuronpedia.org/<neuronpedia_id>/<latent>`` when the SAE names its Neuronpedia id (sae-lens's
    ``cfg.metadata.neuronpedia_id``, set for released SAEs such as Gemma Scope), else None."""
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{int(latent)}" if neuronpedia_id else None


def write_drift(path: str | os.PathLike, rows: Sequence[Mapping], n_responses: int, d_sae: int,
                sae: Mapping | None = None) -> Path:
    """``drift.json``: the listing plus what it was computed over (responses, SAE width and identity)."""
    sae = dict(sae or {})
    rows = [{**r, "neuronpedia": neuronpedia_url(sae.get("neuronpedia_id"), r["id"])} for r in rows]
    doc = {"ranking": "|policy_mean - reference_mean| of the mean pooled SAE activation over held-out responses",
           "n_responses": int(n_responses), "d_sae": int(d_sae), "sae": sae, "top": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_drift(path: str | os.PathLike) -> list[dict]:
    return json.loads(Path(path).read_text())["top"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_drift(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "latents that drift") -> Path:
    """Paired bars: reference and policy mean activation of the listed latents, in ranking order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 3.4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["reference_mean"] for r in rows], width=0.4, label="reference")
    ax.bar([i + 0.2 for i in x], [r["policy_mean"] for r in rows], width=0.4, label="policy")
    ax.set_xticks(list(x), [str(r["id"]) for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("SAE latent id (largest |change| first)")
    ax.set_ylabel("mean pooled activation")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drift_comparison(tables: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                          baseline: str = "fpo") -> Path:
    """One panel per method: the change of each of its top latents, bars of latents also in ``baseline``'s top
    set drawn solid, the others hatched."""
    plt = _pyplot()
    names = list(tables)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False, sharey=True)
    base = set(top_ids(tables.get(baseline, [])))
    for ax, name in zip(axes[0], names):
        rows = tables[name]
        for i, r in enumerate(rows):
            ax.bar(i, r["change"], color="C0" if r["id"] in base else "C1", hatch="" if r["id"] in base else "//")
        ax.set_xticks(range(len(rows)), [str(r["id"]) for r in rows], rotation=90, fontsize=6)
        ax.axhline(0, color="k", lw=0.5)
        ov = overlap(top_ids(rows), top_ids(tables.get(baseline, [])))
        ax.set_title(f"{name} (overlap with {baseline} {ov:.2f})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("policy − reference mean activation")
    return _save(plt, fig, path)
