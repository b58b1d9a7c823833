"""Evaluation during training (``fpo_dist.evaluation_loop``), in one process: the rank split covers every held-out
pair once, the pair-weighted reduction over any number of ranks equals one computation over all pairs (an
independent oracle: a forward hook, sae-lens's own ``encode`` and the pure loss functions), the provenance check.
The multi-process runs through the real trainer are in ``test_train.py``."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fpo_dist.evaluation_loop import local_sums, means, provenance_differences, rank_batches

N_PAIRS = 7  # odd on purpose


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_rank_batches_cover_every_pair_once_with_equal_forward_counts(n, world, batch):
    ok = np.arange(100, 100 + 3 * n, 3)  # sparse row ids, as in a store with bad rows
    per_rank = [rank_batches(ok[::-1], r, world, batch) for r in range(world)]  # any input order
    assert len({len(b) for b in per_rank}) == 1  # ZeRO-3: every rank runs the same number of forwards
    counted = [int(x) for batches in per_rank for rows, counts in batches if counts for x in rows]
    assert sorted(counted) == ok.tolist()
    for batches in per_rank:
        assert all(1 <= len(rows) <= batch for rows, _ in batches)
        flags = [counts for _, counts in batches]
        assert flags == sorted(flags, reverse=True)  # fillers (weight 0) only after the real batches


def test_rank_batches_refuse_an_empty_cache():
    with pytest.raises(ValueError, match="no ok rows"):
        rank_batches(np.array([], dtype=np.int64), 0, 2, 2)


def _prov(**changes):
    prov = {"code_version": "0.1.0", "model": {"name_or_path": "m", "dtype": "float32"},
            "tokenizer": {"tokenizer_sha256": "t"}, "sae": {"source": "s", "layer": 1}, "hook": "blocks.1.hook_resid_post",
            "batch_size": 8,
            "data": {"source": "hub/uf", "split": "train_prefs", "revision": None, "content_sha256": "a", "n_rows": 10,
                     "max_rows": None, "schema": "strings", "columns": {}, "on_bad_row": "skip", "template": "chat",
                     "max_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_end", "over_length": "truncate"}}
    for key, value in changes.items():
        section, name = key.split("__")
        prov[section] = {**prov[section], name: value}
    return prov


def test_provenance_allows_only_the_data_identity_to_differ():
    train = _prov()
    held_out = _prov(data__split="test_prefs", data__content_sha256="b", data__n_rows=3, data__source="x.jsonl",
                     data__on_bad_row="fail")
    held_out["batch_size"] = 2
    assert provenance_differences(train, held_out) == []
    diffs = provenance_differences(train, _prov(model__name_or_path="other", sae__layer=2, data__max_length=128))
    assert diffs == ["data.max_length: training cache 64, eval cache 128",
                     "model.name_or_path: training cache 'm', eval cache 'other'",
                     "sae.layer: training cache 1, eval cache 2"]


# --------------------------------------------------------------------------------------------- numbers


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """The tiny policy and SAE, and a finalized store of N_PAIRS pairs (2 bad rows) with arbitrary cached values."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    from fpo_dist.data import BAD_REASONS, BadRow, TokenizedPair
    from fpo_dist.store import ShardResult, create_store, open_store

    model = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32)
    sae = SAE.load_from_disk(str(tiny.sae_dir))
    sae.requires_grad_(False)
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("eval") / "store")
    store = create_store(path, {"model": "synthetic"}, n_rows=N_PAIRS + 2, rows_per_shard=N_PAIRS + 2,
                         chunk_rows=N_PAIRS + 2)
    pairs, bad, logp, ntok, codes = [], [BadRow(3, BAD_REASONS[0], None, "x"), BadRow(6, BAD_REASONS[0], None, "y")], [], [], []
    for i in sorted(set(range(N_PAIRS + 2)) - {3, 6}):
        ids = [tuple(int(t) for t in rng.integers(5, 400, n)) for n in rng.integers(2, 12, size=3)]
        pairs.append(TokenizedPair(i, hashlib.md5(str(i).encode()).digest(), *ids))
        logp.append([-rng.random() * 30 - 5, -rng.random() * 30 - 5])
        ntok.append((len(ids[1]), len(ids[2])))
        codes.append(tuple((np.sort(rng.choice(128, 12, replace=False)), rng.random(12).astype(np.float32) + 0.1)
                           for _ in range(2)))
    store.commit_shard(0, store.write_shard(0, ShardResult.build(0, N_PAIRS + 2, pairs, bad, logp, ntok, codes)))
    store.finalize()
    return model, sae, open_store(path), tiny.hook_layer


def _oracle(model, sae, store, layer, loss_name, params):
    """All pairs in ONE batch: a forward hook on block ``layer``, sae-lens's encode, the pure loss function."""
    from fpo_dist.losses import SparseCodes, dpo_loss, fpo_loss, prediction_mask, sequence_logps
    from fpo_dist.models import build_batch, pairs_from_batch

    batch = store.read_rows(store.ok_rows())
    pb = build_batch(pairs_from_batch(batch), pad_id=0)
    captured = {}
    h = model.model.layers[layer].register_forward_hook(lambda m, i, o: captured.update(x=o))
    with torch.no_grad():
        logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
    h.remove()
    hidden = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
    total, _, avg = sequence_logps(logits, pb.input_ids, pb.response_mask)
    n = len(batch.index)
    if loss_name == "dpo":
        ref = torch.tensor(batch.logp_sum)
        loss, metrics = dpo_loss(total[:n], total[n:], ref[:, 0], ref[:, 1], **params)
    else:
        pm = prediction_mask(pb.response_mask)
        with torch.no_grad():
            pooled = (sae.encode(hidden) * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)
        ref_avg = torch.tensor(batch.logp_sum / batch.n_tokens)
        refs = [SparseCodes(torch.tensor(c.offsets), torch.tensor(c.indices), torch.tensor(c.values))
                for c in (batch.chosen_codes, batch.rejected_codes)]
        loss, metrics = fpo_loss(avg[:n], avg[n:], ref_avg[:, 0], ref_avg[:, 1], pooled[:n], pooled[n:], *refs, **params)
    return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in metrics.items()}, "eval/n_pairs": n}


@pytest.mark.parametrize("loss_name,params", [("fpo", {"beta": 0.5, "alpha": 2.0, "k": 4}), ("dpo", {"beta": 0.1})])
@pytest.mark.parametrize("world,batch", [(1, 7), (1, 2), (2, 2), (3, 1), (4, 3)])
def test_reduced_eval_equals_one_computation_over_all_pairs(setup, loss_name, params, world, batch):
    from fpo_dist.forward import LossContext
    from fpo_dist.losses import LOSSES

    model, sae, store, layer = setup
    spec = LOSSES[loss_name]
    ctx = LossContext(spec, {**spec.hyper_parameters, **params}, sae=sae, layer=layer)
    model.train(True)
    totals, n = {}, 0
    for rank in range(world):  # the ranks' partial sums, added as dist.sum adds them
        sums, count = local_sums(model, ctx, store, rank, world, "cpu", pad_id=0, batch_size=batch)
        n += count
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
    assert model.training  # the evaluation restored train mode
    got = means(totals, n)
    want = _oracle(model, sae, store, layer, loss_name, params)
    assert got["eval/n_pairs"] == want["eval/n_pairs"] == N_PAIRS
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_evaluation_consumes_no_random_numbers(setup):
    from fpo_dist.forward import LossContext
    from fpo_dist.losses import LOSSES

    model, sae, store, layer = setup
    ctx = LossContext(LOSSES["fpo"], dict(LOSSES["fpo"].hyper_parameters), sae=sae, layer=layer)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    local_sums(model, ctx, store, 0, 1, "cpu", pad_id=0, batch_size=2)
    assert torch.equal(torch.get_rng_state(), before)
