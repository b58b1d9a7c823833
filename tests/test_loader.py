"""The data loader: deterministic world-size-independent order, resume, content, prefetch thread."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time

import numpy as np
import pytest
import torch

from fpo_dist.data import BAD_REASONS, BadRow, TokenizedPair
from fpo_dist.loader import CacheLoader, SampleOrder, Topology
from fpo_dist.store import CacheStore, ShardResult, create_store

SEED = 7
PAD = 60000  # above every synthetic token id
N_FEATURES = 4096
# 63 rows (50 ok): shards of 20 (the last one 3 rows), chunks of 10, flat chunks of 64 elements.
PLAN = dict(n_rows=63, rows_per_shard=20, chunk_rows=10, ragged_chunk=64)


def _synthetic_shard(k: int, start: int, stop: int):
    """A deterministic shard, ~1 row in 5 bad; returns (ShardResult, {row: expected content})."""
    rng = np.random.default_rng([123, k])
    pairs, bad, logp, ntok, pooled, expected = [], [], [], [], [], {}
    for i in range(start, stop):
        if rng.random() < 0.2:
            bad.append(BadRow(i, BAD_REASONS[0], None, f"row {i}"))
            continue
        ids = [tuple(int(t) for t in rng.integers(0, 50000, n)) for n in rng.integers(1, 9, size=3)]
        pair = TokenizedPair(i, hashlib.md5(str(i).encode()).digest(), *ids)
        codes = []
        for _ in range(2):
            nnz = int(rng.integers(0, 6))  # 0 happens: an all-zero pooled vector
            codes.append((rng.choice(N_FEATURES, nnz, replace=False), rng.random(nnz, dtype=np.float32) + 0.1))
        pairs.append(pair)
        logp.append([-rng.random() * 10, -rng.random() * 10])
        ntok.append((len(ids[1]), len(ids[2])))
        pooled.append(tuple(codes))
        expected[i] = dict(pair=pair, logp=np.float32(logp[-1]), n_tokens=ntok[-1],
                           codes=[(np.sort(idx), val[np.argsort(idx)]) for idx, val in codes])
    return ShardResult.build(start, stop, pairs, bad, logp, ntok, pooled), expected


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(path, {ok row: expected content}, sorted bad rows) of a finalized synthetic store."""
    path = str(tmp_path_factory.mktemp("loader") / "cache")
    store = create_store(path, {"model": "synthetic"}, **PLAN)
    expected = {}
    for k in range(store.plan.n_shards):
        result, exp = _synthetic_shard(k, *store.plan.shard_range(k))
        store.commit_shard(k, store.write_shard(k, result))
        expected.update(exp)
    store.finalize()
    ok = sorted(expected)
    bad = sorted(set(range(PLAN["n_rows"])) - set(ok))
    assert len(bad) > 5 and len(ok) > 40
    return path, expected, bad


def _loaders(path, micro, accum, world, **kw):
    kw = {"seed": SEED, "pad_id": PAD, "epochs": 2, "prefetch": 0, **kw}
    return [CacheLoader(path, micro_batch_size=micro, grad_accum=accum, world_size=world, rank=r, **kw)
            for r in range(world)]


def run_steps(path, micro, accum, world, max_steps=None, **kw):
    """All ranks in lockstep, one optimizer step at a time.  Returns ``([(epoch, global batch rows)], state)``,
    the global batch laid out as the rank mapping says: micro-step by micro-step, rank by rank."""
    loaders = _loaders(path, micro, accum, world, **kw)
    steps = []
    try:
        while max_steps is None or len(steps) < max_steps:
            per_rank = [list(itertools.islice(loader, accum)) for loader in loaders]
            if not per_rank[0]:
                assert not any(per_rank)
                break
            assert all(len(mbs) == accum for mbs in per_rank)
            heads = {(mb.epoch, mb.sample_offset, mb.micro_step, mb.is_step_end) for mbs in per_rank for mb in mbs}
            assert len(heads) == accum  # every rank is at the same place
            assert [mb.is_step_end for mb in per_rank[0]] == [False] * (accum - 1) + [True]
            rows = np.concatenate([per_rank[r][m].rows for m in range(accum) for r in range(world)])
            steps.append((per_rank[0][0].epoch, rows))
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)
    finally:
        for loader in loaders:
            loader.close()
    return steps, states[0]


def expected_steps(ok, G, epochs=2, start=(0, 0)):
    """The documented schedule, written out: steps of G consecutive samples of each epoch's permutation."""
    out = []
    for e in range(start[0], epochs):
        order = np.random.default_rng([SEED, e]).permutation(ok)
        p = start[1] if e == start[0] else 0
        while p + G <= len(ok):
            out.append((e, order[p : p + G]))
            p += G
    return out


def assert_same_steps(got, want):
    assert [e for e, _ in got] == [e for e, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- order


def test_sample_order_is_deterministic_per_seed_and_epoch():
    ok = np.array([0, 2, 3, 5, 8, 9, 11, 12, 20, 31])
    order = SampleOrder(ok, seed=3)
    np.testing.assert_array_equal(order.epoch_order(1), SampleOrder(ok.copy(), seed=3).epoch_order(1))
    np.testing.assert_array_equal(order.epoch_order(1), np.random.default_rng([3, 1]).permutation(ok))
    assert sorted(order.epoch_order(0).tolist()) == ok.tolist()
    assert not np.array_equal(order.epoch_order(0), order.epoch_order(1))
    assert not np.array_equal(order.epoch_order(0), SampleOrder(ok, seed=4).epoch_order(0))
    assert (order.steps_per_epoch(4), order.dropped_per_epoch(4)) == (2, 2)
    assert order.normalize(0, 8, 4) == (1, 0) and order.normalize(0, 4, 4) == (0, 4)
    assert list(order.step_starts(3, 4)) == [3]  # resumed off the grid: steps never overlap
    with pytest.raises(ValueError, match="sorted and unique"):
        SampleOrder([3, 1], seed=0)


def test_topology_rank_mapping_written_out():
    # micro 2, accum 3, world 2 (G = 12); step at position 24.  Rank r, micro-step m reads
    # order[24 + m * 4 + r * 2 : ... + 2].
    want = {(0, 0): (24, 26), (1, 0): (26, 28), (0, 1): (28, 30), (1, 1): (30, 32), (0, 2): (32, 34),
            (1, 2): (34, 36)}
    for (r, m), (a, b) in want.items():
        topo = Topology(micro_batch_size=2, grad_accum=3, world_size=2, rank=r)
        assert topo.global_batch == 12
        assert topo.micro_slice(24, m) == slice(a, b)
    with pytest.raises(ValueError, match="rank 2"):
        Topology(2, 3, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Topology(0, 3, 2, 0)


@pytest.mark.parametrize("split", [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)],
                         ids=lambda s: "micro{}-accum{}-world{}".format(*s))
def test_every_world_size_sees_the_same_global_batches(cache, split):
    path, expected, bad = cache
    ok = np.array(sorted(expected))
    steps, state = run_steps(path, *split, prefetch=1)
    assert_same_steps(steps, expected_steps(ok, G=8))
    loader = _loaders(path, *split)[0]
    assert loader.steps_per_epoch == len(ok) // 8 and loader.dropped_per_epoch == len(ok) % 8 > 0
    assert loader.total_steps == len(steps)
    for e in (0, 1):
        seen = np.concatenate([rows for ep, rows in steps if ep == e])
        assert len(seen) == len(set(seen.tolist())) == len(ok) - loader.dropped_per_epoch  # each at most once
        assert set(seen.tolist()) <= set(ok.tolist()) and not set(seen.tolist()) & set(bad)
    assert state == {"epoch": 2, "consumed_samples": 0, "seed": SEED, "global_batch": 8, "n_ok": len(ok)}


def test_epochs_reshuffle(cache):
    path, expected, _ = cache
    steps, _ = run_steps(path, 4, 1, 1)
    first = np.concatenate([rows for e, rows in steps if e == 0])
    second = np.concatenate([rows for e, rows in steps if e == 1])
    assert not np.array_equal(first, second)


# ----------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "before, after, stop_at",
    [
        ((2, 2, 2), (4, 2, 1), 3),  # world 2 -> world 1, within epoch 0
        ((4, 2, 1), (2, 2, 2), 7),  # world 1 -> world 2, within epoch 1
        ((2, 4, 1), (8, 1, 1), 5),  # micro/accum split changes, same G, state across the epoch boundary
        ((1, 2, 4), (2, 1, 4), 1),
    ],
    ids=["w2-to-w1", "w1-to-w2", "accum4-to-accum1", "w4-split"],
)
def test_resume_continues_with_the_next_unseen_sample(cache, before, after, stop_at):
    path, expected, _ = cache
    # The uninterrupted run's steps: test_every_world_size_sees_the_same_global_batches checks that a loader
    # run yields exactly these.
    uninterrupted = expected_steps(np.array(sorted(expected)), G=8)
    head, state = run_steps(path, *before, max_steps=stop_at)
    tail, end = run_steps(path, *after, start_state=state, prefetch=2)
    assert_same_steps(head, uninterrupted[:stop_at])
    assert_same_steps(head + tail, uninterrupted)
    assert end["epoch"] == 2
    for e in (0, 1):
        seen = np.concatenate([rows for ep, rows in head + tail if ep == e]).tolist()
        assert len(seen) == len(set(seen))


def test_resume_with_another_global_batch_continues_from_the_same_position(cache):
    path, expected, _ = cache
    ok = np.array(sorted(expected))
    head, state = run_steps(path, 2, 2, 2, max_steps=2)  # G = 8: 16 samples of epoch 0 consumed
    assert state["consumed_samples"] == 16 and state["epoch"] == 0
    tail, _ = run_steps(path, 3, 2, 2, start_state=state)  # G = 12, from position 16 of epoch 0
    assert_same_steps(head, expected_steps(ok, G=8)[:2])
    assert_same_steps(tail, expected_steps(ok, G=12, start=(0, 16)))
    epoch0 = np.concatenate([rows for e, rows in head + tail if e == 0]).tolist()
    assert len(epoch0) == len(set(epoch0)) == 16 + (len(ok) - 16) // 12 * 12


def test_state_counts_only_finished_steps(cache):
    """A state taken mid-step (or with micro-batches read ahead) resumes at the start of that step."""
    path, expected, _ = cache
    with _loaders(path, 2, 3, 1, prefetch=2)[0] as loader:
        next(loader)
        next(loader)
        assert loader.state_dict()["consumed_samples"] == 0
        time.sleep(0.1)  # let the thread read ahead
        assert loader.state_dict()["consumed_samples"] == 0
        third = next(loader)
        assert third.is_step_end and loader.state_dict()["consumed_samples"] == 6
        mid = next(loader)
        state = loader.state_dict()
        assert state["consumed_samples"] == 6
    with _loaders(path, 2, 3, 1, start_state=state)[0] as resumed:
        again = next(resumed)
    assert again.micro_step == 0 and again.sample_offset == 6
    np.testing.assert_array_equal(again.rows, mid.rows)


def test_resume_checks(cache):
    path, _, _ = cache
    loader = _loaders(path, 2, 2, 1)[0]
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loaders(path, 2, 2, 1, seed=SEED + 1, start_state=state)
    with pytest.raises(ValueError, match="ok rows"):
        _loaders(path, 2, 2, 1, ok_rows=loader.order.ok_rows[:-1], start_state=state)
    with pytest.raises(ValueError, match="consumed_samples"):
        loader.load_state_dict({**state, "consumed_samples": 10_000})


# ----------------------------------------------------------------------------------------- content


def test_micro_batch_holds_what_the_store_holds(cache):
    path, expected, _ = cache
    with CacheLoader(CacheStore(path), micro_batch_size=5, grad_accum=1, world_size=1, rank=0, seed=SEED,
                     pad_id=PAD) as loader:
        mbs = [next(loader) for _ in range(2)]
    for mb in mbs:
        B = len(mb.rows)
        assert B == 5 and mb.input_ids.shape[0] == 2 * B and mb.input_ids.dtype == torch.long
        assert mb.ref_logp_sum.dtype == torch.float32 and mb.ref_logp_sum.shape == (B, 2)
        assert mb.ref_n_tokens.dtype == torch.int64
        T = mb.input_ids.shape[1]
        for b, i in enumerate(mb.rows.tolist()):
            e = expected[i]
            p = e["pair"]
            assert mb.uids[b] == p.uid.hex()
            for row, resp in ((b, p.chosen_ids), (B + b, p.rejected_ids)):
                n_p, n = len(p.prompt_ids), len(p.prompt_ids) + len(resp)
                assert mb.input_ids[row].tolist() == list(p.prompt_ids + resp) + [PAD] * (T - n)
                assert mb.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
                assert mb.response_mask[row].tolist() == [False] * n_p + [True] * len(resp) + [False] * (T - n)
            np.testing.assert_array_equal(mb.ref_logp_sum[b].numpy(), e["logp"])
            assert mb.ref_n_tokens[b].tolist() == list(e["n_tokens"])
            for side, codes in enumerate((mb.ref_codes_chosen, mb.ref_codes_rejected)):
                lo, hi = codes.offsets[b].item(), codes.offsets[b + 1].item()
                np.testing.assert_array_equal(codes.indices[lo:hi].numpy(), e["codes"][side][0])
                np.testing.assert_array_equal(codes.values[lo:hi].numpy(), e["codes"][side][1])
        assert mb.ref_codes_chosen.batch_size == B
    np.testing.assert_array_equal(np.concatenate([mb.rows for mb in mbs]),
                                  np.random.default_rng([SEED, 0]).permutation(sorted(expected))[:10])


def test_bad_inputs_are_refused(cache, tmp_path):
    path, expected, bad = cache
    with pytest.raises(ValueError, match="not ok"):
        _loaders(path, 2, 1, 1, ok_rows=[sorted(expected)[0], bad[0]])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loaders(path, 8, 4, 2)
    unfinished = str(tmp_path / "unfinished")
    store = create_store(unfinished, {"model": "synthetic"}, **PLAN)
    store.write_shard(0, _synthetic_shard(0, 0, 20)[0])
    with pytest.raises(ValueError, match="not finalized"):
        _loaders(unfinished, 2, 1, 1)
    subset = sorted(expected)[:20]  # a subset (e.g. a held-out split) is what is iterated
    steps, _ = run_steps(path, 4, 1, 1, ok_rows=subset, epochs=1)
    assert sorted(np.concatenate([r for _, r in steps]).tolist()) == subset


# ----------------------------------------------------------------------------------------- prefetch


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("fpo-loader-prefetch") and t.is_alive()]


def test_reader_error_surfaces_in_the_consumer(cache, monkeypatch):
    path, _, _ = cache
    real, calls = CacheStore.read_rows, []

    def flaky(self, indices, extras=False, ref_topm=False):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real(self, indices, extras, ref_topm)

    monkeypatch.setattr(CacheStore, "read_rows", flaky)
    loader = _loaders(path, 2, 2, 1, prefetch=2)[0]
    next(loader)
    next(loader)
    with pytest.raises(OSError, match="disk went away"):
        next(loader)
    assert not _prefetch_threads()
    assert loader.state_dict()["consumed_samples"] == 4
    assert next(loader).sample_offset == 4  # iterating again retries from the state
    loader.close()
    assert not _prefetch_threads()


def test_close_joins_the_thread_and_read_ahead_is_bounded(cache, monkeypatch):
    path, _, _ = cache
    real, calls = CacheStore.read_rows, []
    monkeypatch.setattr(CacheStore, "read_rows", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with _loaders(path, 1, 1, 1, prefetch=2)[0] as loader:
        next(loader)
        assert len(_prefetch_threads()) == 1
        time.sleep(0.2)  # the queue fills up
        assert len(calls) <= 1 + 2 + 1  # consumed + queued + the one the blocked producer holds
    assert not _prefetch_threads()  # __exit__ -> close() joined it while it was blocked on a full queue
    loader.close()  # twice is fine

    dropped = _loaders(path, 1, 1, 1, prefetch=1)[0]
    next(dropped)
    del dropped  # a loader dropped without close() stops its thread
    deadline = time.monotonic() + 5
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _prefetch_threads()


def test_a_flipped_byte_stops_the_loader_before_its_rows_are_used(cache, tmp_path):
    """Verify on read, through the prefetch thread: a byte flipped (from outside) in a data chunk of shard 1 stops
    the loader with an error naming the shard, array and rows; no micro-batch holding a row of it came out."""
    import shutil

    from fpo_dist.store import ShardCorruptError

    path, expected, _ = cache
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    chunk = broken / "shards" / "000001" / "code_values" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0x01  # in the compressed payload's tail
    chunk.write_bytes(bytes(raw))
    seen = []
    with pytest.raises(ShardCorruptError) as err, _loaders(str(broken), 2, 1, 1, prefetch=2)[0] as loader:
        for mb in loader:
            seen.extend(mb.rows.tolist())
    msg = str(err.value)
    assert "shard 1 (rows 20..39)" in msg and "code_values" in msg and "rows 2" in msg, msg
    assert f"python -m fpo_dist.cache verify {broken}" in msg
    assert not [r for r in seen if 20 <= r < 40]
