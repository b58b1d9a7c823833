"""The Zarr cache store: round trip, resume / provenance checks, verify, concurrent writers, zarr isolation."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fpo_dist.data import BAD_REASONS, BadRow, TokenizedPair
from fpo_dist.store import (
    RowsNotAvailableError,
    ShardCommittedError,
    ShardResult,
    StoreFormatError,
    StoreMismatchError,
    create_store,
    open_store,
)

PROVENANCE = {"model": "tiny-llama", "revision": "abc123", "sae": {"release": "tiny", "layer": 2}, "max_length": 64}
# 47 rows, shards of 20 (last one 7 rows, in a partial chunk), chunks of 10 rows, flat chunks of 64 elements
# (so rows straddle flat chunks).
PLAN = dict(n_rows=47, rows_per_shard=20, chunk_rows=10, ragged_chunk=64)
ALL_OPTIONS = {"token_logps": True, "token_codes": True}
N_FEATURES = 16384


def synthetic_shard(k: int, start: int, stop: int, options: dict, seed: int = 0):
    """A deterministic shard: ~1 row in 5 bad; returns (ShardResult, expected per-row dict for ok rows)."""
    rng = np.random.default_rng([seed, k])
    pairs, bad, logp, ntok, pooled, tlp, tcodes, expected = [], [], [], [], [], [], [], {}
    for i in range(start, stop):
        if rng.random() < 0.2:
            reason = BAD_REASONS[int(rng.integers(len(BAD_REASONS)))]
            bad.append(BadRow(i, reason, "chosen" if i % 2 else None, f"detail for row {i}"))
            continue
        lens = rng.integers(1, 12, size=3)
        ids = [tuple(int(t) for t in rng.integers(0, 50000, n)) for n in lens]
        pair = TokenizedPair(i, hashlib.md5(str(i).encode()).digest(), *ids)
        n_tok = (int(lens[1]), int(lens[2]))
        codes, logps, tok = [], [], []
        for side in range(2):
            nnz = int(rng.integers(0, 20))  # 0 happens: an all-zero pooled vector
            idx = rng.choice(N_FEATURES, nnz, replace=False)
            codes.append((idx, rng.random(nnz, dtype=np.float32) + 0.1))
            logps.append(-rng.random(n_tok[side], dtype=np.float32))
            per_tok = rng.integers(0, 4, n_tok[side])
            tok.append((per_tok, rng.integers(0, N_FEATURES, per_tok.sum()), rng.random(per_tok.sum(), np.float32)))
        pairs.append(pair)
        logp.append([-rng.random() * 10, -rng.random() * 10])
        ntok.append(n_tok)
        pooled.append(tuple(codes))
        tlp.append(tuple(logps))
        tcodes.append(tuple(tok))
        expected[i] = dict(pair=pair, logp=np.float32(logp[-1]), n_tokens=n_tok,
                           codes=[(np.sort(c[0]), c[1][np.argsort(c[0])]) for c in codes], token_logps=logps, tok=tok)
    perm = rng.permutation(len(pairs))  # the worker may hand rows over in any order
    take = lambda xs: [xs[j] for j in perm]  # noqa: E731
    result = ShardResult.build(
        start, stop, take(pairs), bad[::-1], take(logp), take(ntok), take(pooled),
        token_logps=take(tlp) if options.get("token_logps") else None,
        token_codes=take(tcodes) if options.get("token_codes") else None,
    )
    return result, expected, bad


def build_store(path, options=ALL_OPTIONS, commit=True, finalize=True, skip_commit=()):
    store = create_store(str(path), PROVENANCE, options=options, **PLAN)
    expected, bad = {}, []
    for k in range(store.plan.n_shards):
        result, exp, b = synthetic_shard(k, *store.plan.shard_range(k), options)
        expected.update(exp)
        bad += b
        checksum = store.write_shard(k, result)
        assert checksum == result.checksum()
        if commit and k not in skip_commit:
            store.commit_shard(k, checksum)
    if finalize:
        store.finalize()
    return store, expected, sorted(bad, key=lambda b: b.index)


def assert_rows_equal(batch, rows, expected, extras):
    assert batch.index.tolist() == list(rows)
    for j, i in enumerate(rows):
        e = expected[i]
        assert batch.uid[j].tobytes() == e["pair"].uid
        assert batch.prompt_ids[j].tolist() == list(e["pair"].prompt_ids)
        assert batch.chosen_ids[j].tolist() == list(e["pair"].chosen_ids)
        assert batch.rejected_ids[j].tolist() == list(e["pair"].rejected_ids)
        np.testing.assert_array_equal(batch.logp_sum[j], e["logp"])
        assert batch.n_tokens[j].tolist() == list(e["n_tokens"])
        for side, csr in enumerate((batch.chosen_codes, batch.rejected_codes)):
            idx, val = csr.row(j)
            np.testing.assert_array_equal(idx, e["codes"][side][0])
            np.testing.assert_array_equal(val, e["codes"][side][1])
        if not extras:
            assert batch.chosen_token_logps is None and batch.chosen_token_codes is None
            continue
        for side, (lps, codes) in enumerate(((batch.chosen_token_logps, batch.chosen_token_codes),
                                             (batch.rejected_token_logps, batch.rejected_token_codes))):
            np.testing.assert_array_equal(lps[j], e["token_logps"][side])
            per_tok, idx, val = e["tok"][side]
            assert len(codes[j]) == len(per_tok)
            np.testing.assert_array_equal(np.diff(codes[j].offsets), per_tok)
            np.testing.assert_array_equal(codes[j].indices, idx)
            np.testing.assert_array_equal(codes[j].values, val)


@pytest.mark.parametrize("options", [ALL_OPTIONS, {}], ids=["with-extras", "plain"])
def test_round_trip(tmp_path, options):
    store, expected, bad = build_store(tmp_path / "cache", options)
    assert store.verify() == []
    reader = open_store(str(tmp_path / "cache"))
    ok_rows = sorted(expected)
    rng = np.random.default_rng(1)
    subsets = [ok_rows, ok_rows[::-1], [ok_rows[3]], [ok_rows[5], ok_rows[5], ok_rows[0]]]
    subsets += [rng.choice(ok_rows, size=int(rng.integers(1, 30))).tolist() for _ in range(10)]
    for rows in subsets:
        for extras in (False, True):
            batch = reader.read_rows(rows, extras=extras)
            assert_rows_equal(batch, rows, expected, extras and bool(options))

    assert reader.status_counts() == {
        "ok": len(expected),
        "not_written": 0,
        "bad": {r: n for r in BAD_REASONS if (n := sum(b.reason == r for b in bad))},
    }
    assert reader.bad_rows() == bad and len(bad) > 0
    with pytest.raises(RowsNotAvailableError, match=f"{bad[0].index}.*{bad[0].reason}"):
        reader.read_rows([ok_rows[0], bad[0].index])

    info = reader.info()
    assert info["complete"] is True and info["rows"]["ok"] == len(expected)
    assert info["tokens"]["total"] == sum(len(e["pair"].prompt_ids + e["pair"].chosen_ids + e["pair"].rejected_ids)
                                          for e in expected.values())
    assert info["pooled_nnz"]["max"] == max(len(c[0]) for e in expected.values() for c in e["codes"])
    assert info["size_bytes"] == sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
    with pytest.raises(PermissionError):
        reader.write_shard(0, synthetic_shard(0, 0, 20, options)[0])


def test_shards_of_only_bad_rows(tmp_path):
    """A chunk whose rows are all bad holds only fill values; it is still stored (so verify can tell a deleted
    chunk file from an empty one), and a shard with no ok row has empty flat arrays."""
    path = str(tmp_path / "cache")
    store = create_store(path, PROVENANCE, n_rows=30, rows_per_shard=10, chunk_rows=10, ragged_chunk=64,
                         options=ALL_OPTIONS)
    for k in (0, 2):
        start, stop = store.plan.shard_range(k)
        bad = [BadRow(i, "too_long", None, "long") for i in range(start, stop)]
        empty = ShardResult.build(start, stop, [], bad, [], [], [], token_logps=[], token_codes=[])
        store.commit_shard(k, store.write_shard(k, empty))
    result, expected, _ = synthetic_shard(1, 10, 20, ALL_OPTIONS)
    store.commit_shard(1, store.write_shard(1, result))
    store.finalize()
    assert store.verify() == []
    assert store.status_counts()["bad"]["too_long"] >= 20
    rows = sorted(expected)
    assert_rows_equal(open_store(path).read_rows(rows, extras=True), rows, expected, True)
    assert_rows_equal(open_store(path).read_rows([], extras=True), [], expected, True)
    for name in ("uid", "lengths", "logp_sum", "nnz"):
        assert (Path(path) / name / "c" / "2" / "0").is_file()


def test_build_validates_its_input():
    pair = TokenizedPair(0, bytes(16), (1, 2), (3,), (4, 5))
    codes = [((np.array([3, 1]), np.array([0.5, 0.25])), (np.array([], int), np.array([])))]
    ShardResult.build(0, 2, [pair], [BadRow(1, "too_long", None, "x")], [[-1.0, -2.0]], [[1, 2]], codes)
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        ShardResult.build(0, 2, [pair], [], [[-1.0, -2.0]], [[1, 2]], codes)
    with pytest.raises(ValueError, match="n_tokens"):
        ShardResult.build(0, 2, [pair], [BadRow(1, "too_long", None, "x")], [[-1.0, -2.0]], [[2, 2]], codes)
    with pytest.raises(ValueError, match="unknown bad-row reason"):
        ShardResult.build(0, 2, [pair], [BadRow(1, "whatever", None, "x")], [[-1.0, -2.0]], [[1, 2]], codes)


def test_create_resume_mismatch_overwrite(tmp_path):
    path = str(tmp_path / "cache")
    store = create_store(path, PROVENANCE, options=ALL_OPTIONS, **PLAN)
    result, _, _ = synthetic_shard(1, *store.plan.shard_range(1), ALL_OPTIONS)
    store.commit_shard(1, store.write_shard(1, result))
    with pytest.raises(ShardCommittedError):
        store.write_shard(1, result)

    # Rewriting an uncommitted shard is idempotent (same checksum), and other content replaces it.
    first = store.write_shard(0, synthetic_shard(0, 0, 20, ALL_OPTIONS, seed=5)[0])
    assert store.write_shard(0, synthetic_shard(0, 0, 20, ALL_OPTIONS, seed=5)[0]) == first
    assert store.write_shard(0, synthetic_shard(0, 0, 20, ALL_OPTIONS)[0]) != first

    resumed = create_store(path, PROVENANCE, options=ALL_OPTIONS, **PLAN)
    assert resumed.committed_shards() == [1] and resumed.pending_shards() == [0, 2]

    changed = {**PROVENANCE, "model": "other-model", "sae": {"release": "tiny", "layer": 3}, "seed": 7}
    with pytest.raises(StoreMismatchError) as err:
        create_store(path, changed, options=ALL_OPTIONS, **{**PLAN, "chunk_rows": 5})
    keys = {d[0] for d in err.value.differences}
    assert keys == {"provenance.model", "provenance.sae.layer", "provenance.seed", "plan.chunk_rows"}
    assert "provenance.model: store has 'tiny-llama', requested 'other-model'" in str(err.value)
    with pytest.raises(StoreMismatchError, match="options.token_codes"):
        create_store(path, PROVENANCE, options={"token_logps": True}, **PLAN)

    fresh = create_store(path, changed, options=ALL_OPTIONS, overwrite=True, **PLAN)
    assert fresh.committed_shards() == [] and fresh.provenance == changed
    assert open_store(path).status_counts() == {"ok": 0, "not_written": PLAN["n_rows"], "bad": {}}

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a cache")
    with pytest.raises(StoreFormatError):
        create_store(str(tmp_path / "junk"), PROVENANCE, **PLAN)
    with pytest.raises(FileNotFoundError):
        open_store(str(tmp_path / "nowhere"))


def test_fsspec_url(tmp_path):
    """A URL goes through fsspec (zarr's FsspecStore): same behaviour, sizes from the store's listing."""
    url = f"memory://fpo-store-test/{tmp_path.name}"
    store, expected, _ = build_store(url)
    assert store.verify() == []
    assert 0 < store.size_on_disk() == open_store(url).info()["size_bytes"]
    rows = sorted(expected)[::3]
    assert_rows_equal(open_store(url).read_rows(rows, extras=True), rows, expected, True)
    assert create_store(url, PROVENANCE, options=ALL_OPTIONS, **PLAN).committed_shards() == [0, 1, 2]
    open_store(url, "r+").check_writable()


def test_check_writable(tmp_path):
    path = str(tmp_path / "cache")
    create_store(path, PROVENANCE, **PLAN)
    before = sorted(p.name for p in Path(path).iterdir())
    open_store(path, "r+").check_writable()
    assert sorted(p.name for p in Path(path).iterdir()) == before
    with pytest.raises(PermissionError):
        open_store(path).check_writable()


def test_verify_names_problems(tmp_path):
    clean = tmp_path / "clean"
    build_store(clean)
    assert open_store(str(clean)).verify() == []

    def corrupted(name, damage):
        path = tmp_path / name
        shutil.copytree(clean, path)
        damage(path)
        return open_store(str(path)).verify()

    problems = corrupted("deleted", lambda p: (p / "shards/000001/code_values/c/0").unlink())
    assert any("shard 1" in x and "code_values" in x and "missing" in x and "rows 20.." in x
               for x in problems), problems

    problems = corrupted("deleted-row-chunk", lambda p: (p / "lengths/c/3/0").unlink())
    assert any("shard 1" in x and "lengths" in x and "rows 30..39" in x for x in problems), problems

    def flip(path):
        chunk = path / "shards/000002/token_ids/c/0"
        raw = bytearray(chunk.read_bytes())
        raw[16:] = bytes(b ^ 0xFF for b in raw[16:])  # keep the blosc header, garble the payload
        chunk.write_bytes(bytes(raw))

    problems = corrupted("flipped", flip)
    assert any("shard 2" in x and "token_ids" in x for x in problems), problems

    def flip_value(path):  # corruption that decodes fine: rewrite a chunk with other values
        (path / "logp_sum/c/0/0").write_bytes((path / "logp_sum/c/1/0").read_bytes())

    problems = corrupted("swapped", flip_value)
    assert any("shard 0" in x and "logp_sum" in x and "rows 0..9" in x and "differ" in x for x in problems), problems
    assert any("shard 0" in x and "checksum mismatch" in x for x in problems), problems

    uncommitted = tmp_path / "uncommitted"
    store, _, _ = build_store(uncommitted, skip_commit=(2,), finalize=False)
    assert store.verify() == ["shard 2 (rows 40..46): not committed"]
    with pytest.raises(RowsNotAvailableError, match="shard 2"):
        store.read_rows([45])


def _write_shards(path: str, shards: list[int]) -> dict[int, bytes]:
    """A cache worker in another process: writes its shards, returns their checksums."""
    store = open_store(path, "r+")
    store.check_writable()
    return {k: store.write_shard(k, synthetic_shard(k, *store.plan.shard_range(k), ALL_OPTIONS)[0]) for k in shards}


def test_two_writers_equal_one_writer(tmp_path):
    plan = {**PLAN, "n_rows": 77}  # 4 shards
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for path in (one, two):
        create_store(path, PROVENANCE, options=ALL_OPTIONS, **plan)

    sums_one = _write_shards(one, [0, 1, 2, 3])
    with mp.get_context("spawn").Pool(2) as pool:
        parts = pool.starmap(_write_shards, [(two, [0, 2]), (two, [3, 1])])
    sums_two = {k: v for part in parts for k, v in part.items()}
    assert sums_one == sums_two
    for path, sums in ((one, sums_one), (two, sums_two)):
        store = open_store(path, "r+")
        for k, checksum in sums.items():
            store.commit_shard(k, checksum)
        store.finalize()
        assert store.verify() == []

    files_one = {p.relative_to(one) for p in Path(one).rglob("*") if p.is_file()}
    files_two = {p.relative_to(two) for p in Path(two).rglob("*") if p.is_file()}
    assert files_one == files_two
    for rel in files_one:
        a, b = (Path(one) / rel).read_bytes(), (Path(two) / rel).read_bytes()
        if rel == Path("zarr.json"):  # root attrs: equal except the finalization time
            a, b = (json.loads(x) for x in (a, b))
            a["attributes"].pop("finalized_at"), b["attributes"].pop("finalized_at")
        assert a == b, rel


def test_store_is_the_only_zarr_importer():
    package = Path(__file__).resolve().parents[1] / "fpo_dist"
    pattern = re.compile(r"^\s*(import\s+zarr|from\s+zarr[\s.])", re.MULTILINE)
    # The owner of each importing file: its top-level module or package under fpo_dist (the store package is one).
    importers = sorted({p.relative_to(package).parts[0] for p in package.rglob("*.py") if pattern.search(p.read_text())})
    assert importers == ["store"]


# ----------------------------------------------------------------------------------------- per-token extras

# The provenance keys `python -m fpo_dist.cache info` prints.
CLI_PROVENANCE = {"model": {"name_or_path": "tiny-llama", "dtype": "float32"}, "hook": "blocks.2",
                  "sae": {"source": "tiny", "sae_id": None},
                  "data": {"source": "pairs.jsonl", "schema": "pairs", "template": "none", "max_length": 64,
                           "max_prompt_length": 32}}
UID = hashlib.md5(b"extras").digest()


def _hand_built_store(path, options):
    """Rows 0 and 2 ok, row 1 bad, one shard; per-token extras written by hand when ``options`` has them."""
    pairs = [TokenizedPair(0, UID, (5, 6), (7, 8, 9), (10,)), TokenizedPair(2, UID, (11,), (12, 13), (14, 15))]
    logps = [(np.array([-0.5, -1.25, -2.0], np.float32), np.array([-3.0], np.float32)),
             (np.array([-0.125, -0.75], np.float32), np.array([-1.5, -4.0], np.float32))]
    codes = [((np.array([2, 0, 2]), np.array([3, 40, 7, 100], np.int32), np.array([0.5, 1, 2, 3], np.float32)),
              (np.array([1]), np.array([9], np.int32), np.array([0.25], np.float32))),
             ((np.array([0, 0]), np.zeros(0, np.int32), np.zeros(0, np.float32)),
              (np.array([1, 2]), np.array([4, 1, 2], np.int32), np.array([1.5, 2.5, 3.5], np.float32)))]
    result = ShardResult.build(
        0, 3, pairs, [BadRow(1, "too_long", None, "long")], [[-3.75, -3.0], [-0.875, -5.5]], [[3, 1], [2, 2]],
        [(([1], [1.0]), ([2], [2.0])), (([3], [3.0]), ([], []))],
        token_logps=logps if options.get("token_logps") else None,
        token_codes=codes if options.get("token_codes") else None,
    )
    store = create_store(str(path), CLI_PROVENANCE, n_rows=3, rows_per_shard=3, chunk_rows=3, ragged_chunk=4,
                         options=options)
    store.commit_shard(0, store.write_shard(0, result))
    store.finalize()
    return logps, codes


def _info_cli(path, capsys) -> str:
    from fpo_dist.cache.__main__ import main

    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_token_extras_round_trip(tmp_path, capsys):
    path = tmp_path / "extras"
    logps, codes = _hand_built_store(path, ALL_OPTIONS)
    store = open_store(str(path))
    extras = store.read_token_extras([2, 0, 2])
    assert extras.index.tolist() == [2, 0, 2] and len(extras) == 3
    assert extras.n_tokens.tolist() == [[2, 2], [3, 1], [2, 2]]
    for j, i in enumerate([1, 0, 1]):  # position in the hand-built lists
        for side, (lps, csrs) in enumerate(((extras.chosen_token_logps, extras.chosen_token_codes),
                                            (extras.rejected_token_logps, extras.rejected_token_codes))):
            assert lps[j].dtype == np.float32
            np.testing.assert_array_equal(lps[j], logps[i][side])
            per_tok, idx, val = codes[i][side]
            assert len(csrs[j]) == len(per_tok)
            np.testing.assert_array_equal(np.diff(csrs[j].offsets), per_tok)
            np.testing.assert_array_equal(csrs[j].indices, idx)
            np.testing.assert_array_equal(csrs[j].values, val)
    np.testing.assert_array_equal(extras.chosen_token_codes[1].row(0)[0], [3, 40])  # token 0 of row 0, chosen
    np.testing.assert_array_equal(extras.chosen_token_codes[1].row(2)[1], [2, 3])
    with pytest.raises(RowsNotAvailableError, match="too_long"):
        store.read_token_extras([1])

    assert store.token_extras_info() == {
        "token_logps": {"values": 8, "bytes": store.token_extras_info()["token_logps"]["bytes"]},
        "token_codes": {"tokens": 8, "nnz": 8, "bytes": store.token_extras_info()["token_codes"]["bytes"]},
        "ref_topm": None,
    }
    assert store.token_extras_info()["token_logps"]["bytes"] == sum(
        f.stat().st_size for f in (path / "shards/000000/token_logps").rglob("*") if f.is_file())
    out = _info_cli(path, capsys)
    assert "per-token log-probs: 8 values" in out and "per-token SAE codes: 8 tokens, 8 non-zeros" in out
    assert "reference top-M distributions: none (built without --ref_topm)" in out
    assert "row 0: chosen 3 tokens, rejected 1" in out and "chosen code non-zeros 4" in out

    only_logps = tmp_path / "only-logps"
    _hand_built_store(only_logps, {"token_logps": True})
    extras = open_store(str(only_logps)).read_token_extras([0])
    np.testing.assert_array_equal(extras.rejected_token_logps[0], logps[0][1])
    assert extras.chosen_token_codes is None and extras.rejected_token_codes is None
    assert "per-token SAE codes: none" in _info_cli(only_logps, capsys)


def test_store_without_token_extras_says_so(tmp_path, capsys):
    path = tmp_path / "plain"
    _hand_built_store(path, {})
    store = open_store(str(path))
    assert store.read_token_extras([0, 2]) is None
    assert store.token_extras_info() is None
    assert store.read_rows([0, 2], extras=True).chosen_token_logps is None
    assert "per-token extras: none" in _info_cli(path, capsys)


# --------------------------------------------------------------------------------------------- integrity (issue 13)


def _flip_byte(chunk: Path, offset: int | None = None) -> None:
    """A flipped byte in a stored file, as a bad disk or a bad copy leaves it (injected from outside the reader)."""
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    chunk.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "clean"
    _, expected, _ = build_store(path)
    return path, expected


def _copy(clean_store, tmp_path, name="copy") -> Path:
    path = tmp_path / name
    shutil.copytree(clean_store[0], path)
    return path


@pytest.mark.parametrize("damage, array, rows", [
    ("swap", "logp_sum", "rows 20..29"),  # decodes fine, wrong values: only a checksum sees it
    ("flip", "token_ids", "rows 2"),  # a flipped payload byte of a flat chunk
    ("delete", "code_values", "rows 2"),  # a lost chunk file reads as fill values
])
def test_verify_on_read_stops_at_a_damaged_shard(clean_store, tmp_path, damage, array, rows):
    """Verify on read: the first read of shard 1 checks it against its committed checksum; nothing of it is
    returned, and the error names the shard, the array, the rows and points at ``verify``."""
    from fpo_dist.store import ShardCorruptError

    path = _copy(clean_store, tmp_path)
    if damage == "swap":
        (path / "logp_sum/c/2/0").write_bytes((path / "logp_sum/c/3/0").read_bytes())
    elif damage == "flip":
        _flip_byte(path / "shards/000001/token_ids/c/1")
    else:
        (path / "shards/000001/code_values/c/0").unlink()
    store = open_store(str(path))
    ok = sorted(clean_store[1])
    shard0, shard1 = [r for r in ok if r < 20], [r for r in ok if 20 <= r < 40]
    assert_rows_equal(store.read_rows(shard0[:3]), shard0[:3], clean_store[1], False)  # other shards still read
    with pytest.raises(ShardCorruptError) as err:
        store.read_rows([shard0[0], shard1[-1]])
    msg = str(err.value)
    assert "shard 1 (rows 20..39)" in msg and array in msg and rows in msg, msg
    assert f"python -m fpo_dist.cache verify {path}" in msg and "\n" not in msg
    with pytest.raises(ShardCorruptError):  # and it keeps refusing: the shard was never marked verified
        store.read_rows([shard1[0]])
    assert open_store(str(path), verify_reads=False).read_rows([shard1[0]]) is not None  # opt-out exists


def test_verify_on_read_checks_each_shard_once_per_handle(clean_store, monkeypatch):
    from fpo_dist.store import CacheStore

    calls = []
    real = CacheStore._check_shard
    monkeypatch.setattr(CacheStore, "_check_shard", lambda self, k, *a: calls.append(k) or real(self, k, *a))
    store = open_store(str(clean_store[0]))
    ok = sorted(clean_store[1])
    for _ in range(3):
        store.read_rows(ok[::2])
    store._index_cache.clear()  # evicted: re-read and checked against the kept block digests (test_store_io.py),
    store.read_rows(ok)  # not by a second full check
    assert sorted(calls) == [0, 1, 2]


def _garbage(rel):
    return lambda p: (p / rel).write_bytes(b"\xff\xfe\x00\x9cgarbage")  # not UTF-8, not JSON


def _truncate(rel):
    return lambda p: (p / rel).write_bytes((p / rel).read_bytes()[:40])


def _newer_version(p):
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (p / "zarr.json").write_text(json.dumps(meta))


UNREADABLE = {  # damage -> what the one-line error must name
    "root metadata garbage": (_garbage("zarr.json"), "clean/zarr.json is corrupted or truncated"),
    "root metadata truncated": (_truncate("zarr.json"), "clean/zarr.json is corrupted or truncated"),
    "array metadata garbage": (_garbage("status/zarr.json"), "status/zarr.json is corrupted or truncated"),
    "array metadata truncated": (_truncate("lengths/zarr.json"), "lengths/zarr.json is corrupted or truncated"),
    "shard metadata garbage": (_garbage("shards/000001/zarr.json"), "shards/000001/zarr.json is corrupted"),
    "flat metadata garbage": (_garbage("shards/000001/token_ids/zarr.json"), "token_ids/zarr.json is corrupted"),
    "array missing": (lambda p: shutil.rmtree(p / "nnz"), "clean/nnz is missing"),
    "shard directory missing": (lambda p: shutil.rmtree(p / "shards/000001"), "shards/000001 is missing"),
    "flat array missing": (lambda p: shutil.rmtree(p / "shards/000001/code_indices"), "code_indices is missing"),
    "newer format version": (_newer_version, "format version 99; fpo-dist"),
    "not a store": (lambda p: (shutil.rmtree(p), p.mkdir(), (p / "notes.txt").write_text("x")),
                    "no fpo-dist cache store at"),
    "no such path": (lambda p: shutil.rmtree(p), "no fpo-dist cache store at"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_every_unreadable_store_gives_one_clear_error(clean_store, tmp_path, case, capsys):
    """Reader, loader, ``info`` and ``verify`` alike: a StoreError naming the file (never a raw JSON/Unicode/Key
    error); the CLIs print one line and exit 2 (``verify`` lists shard-level damage as problems, exit 1)."""
    from fpo_dist.cache.__main__ import main
    from fpo_dist.loader import CacheLoader
    from fpo_dist.store import StoreError

    damage, expected = UNREADABLE[case]
    path = tmp_path / "clean"  # same name as the fixture's, so messages are comparable
    shutil.copytree(clean_store[0], path)
    damage(path)

    def read():
        store = open_store(str(path))
        store.read_rows(store.ok_rows())

    def load():
        with CacheLoader(str(path), micro_batch_size=4, grad_accum=1, world_size=1, rank=0, seed=0, pad_id=0,
                         prefetch=1) as loader:
            list(loader)

    for what in (read, load):
        with pytest.raises(StoreError) as err:
            what()
        assert expected in str(err.value) and "\n" not in str(err.value), (what.__name__, str(err.value))
    capsys.readouterr()
    rc = main(["info", "--json", str(path)])
    err = capsys.readouterr().err
    if case in ("flat metadata garbage", "flat array missing"):
        assert rc == 0  # info reads per-row arrays and shard attributes only; verify and readers see these
    else:
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    rc = main(["verify", str(path)])
    out = capsys.readouterr()
    if rc == 1:  # damage inside a shard: reported as a problem of that shard
        assert "PROBLEM shard 1" in out.out and expected in out.out, out
    else:
        assert rc == 2 and out.err.count("\n") == 1 and expected in out.err, out


def _write_lease(path: Path, **fields) -> None:
    from fpo_dist.store.lease import LEASE_KEY

    info = {"host": "other-host", "boot_id": "0" * 32, "pid_ns": "pid:[1]", "pid": 1, "pid_start": None,
            "started_at": "2026-01-01T00:00:00+00:00", "heartbeat": 0.0, "beat": 1, "heartbeat_s": 0.1,
            "token": "theirs", **fields}
    path.mkdir(parents=True, exist_ok=True)
    (path / LEASE_KEY).write_text(json.dumps(info))


def test_writer_lease(tmp_path):
    """One writing job per store: a live lease refuses (naming its holder), a dead one is taken over, and the lease
    survives ``create_store(overwrite=True)``.  (Two real cache jobs: tests/test_cache.py; racing takeovers, skewed
    clocks, pid namespaces: tests/test_lease.py.)"""
    import subprocess
    import time

    from fpo_dist.store import StoreLockedError, acquire_lease
    from fpo_dist.store.lease import LEASE_KEY, WriterLease, host_identity

    path = tmp_path / "cache"
    logs = []
    lease = acquire_lease(str(path), log=logs.append)  # before the store exists: planning comes after
    store = create_store(str(path), PROVENANCE, **PLAN)  # the lease file does not make the path "not empty"
    here = host_identity()
    with pytest.raises(StoreLockedError, match=rf"host {here['host']}, pid {os.getpid()}, started "):
        acquire_lease(str(path))
    create_store(str(path), PROVENANCE, overwrite=True, **PLAN)  # deletes the path, lease included ...
    lease.beat()  # ... and the holder writes it again
    assert (path / LEASE_KEY).exists() and lease.lost is None
    lease.release()
    assert not (path / LEASE_KEY).exists() and store.verify() == [f"shard {k} (rows {a}..{b - 1}): not committed"
                                                                  for k, (a, b) in enumerate([(0, 20), (20, 40), (40, 47)])]

    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lease(path, **here, pid=dead.pid)  # same host and pid namespace, pid gone: stale at once
    t = time.monotonic()
    acquire_lease(str(path), log=logs.append).release()
    assert time.monotonic() - t < 5 and any(f"pid {dead.pid} is not running on this host" in m for m in logs), logs

    # another host: its wall-clock heartbeat means nothing here; a record that does not change while watched is dead
    _write_lease(path, heartbeat=time.time())
    taken = acquire_lease(str(path), log=logs.append, stale_s=0.5)
    assert any("host other-host, pid 1" in m and "did not advance" in m for m in logs), logs
    _write_lease(path, heartbeat=time.time())  # someone took it from under us: noticed, and commits stop
    taken.beat()
    with pytest.raises(StoreLockedError, match="lost its writer lease"):
        taken.check()
    taken.release()
    assert (path / LEASE_KEY).exists()  # not ours any more: left alone
    assert isinstance(taken, WriterLease)
