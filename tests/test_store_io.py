"""Reading a store: the bytes that were checked are the bytes used; a transient I/O error is retried, not corruption.

Verify on read checks a shard once per handle, in full, against its committed checksum, and uses those same bytes;
every later read of the shard (a slice of a flat array, the per-row region after the LRU evicted it) is checked
against the digests of the chunks that passed.  The damage is done from outside the reader (bytes of a file on
disk rewritten); the reads are counted by the storage server (moto's request log).  Transient I/O: moto's S3 server
on 127.0.0.1 is stopped under an open handle and started again; the read waits it out within its retry bound, or
fails naming the I/O error (never "corrupted", never advice to rebuild) when the server stays down.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import PLAN, _flip_byte, assert_rows_equal, build_store

from fpo_dist.store import RetryPolicy, ShardCorruptError, StoreIOError, open_store

BUCKET = "fpo-store-io"


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store_io") / "clean"
    _, expected, _ = build_store(path)
    return path, expected


def _copy(clean_store, tmp_path) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(clean_store[0], path)
    return path


def _shard_rows(expected, k: int) -> list[int]:
    a, b = k * PLAN["rows_per_shard"], (k + 1) * PLAN["rows_per_shard"]
    return [r for r in sorted(expected) if a <= r < b]


def _flat_chunk_of(path: Path, row: int, name: str = "token_ids") -> Path:
    """The chunk file of shard 1's flat array ``name`` that holds the first element of ``row`` (read from outside
    the reader: the per-row counts straight from zarr)."""
    start = PLAN["rows_per_shard"]
    count = {"token_ids": "lengths", "code_indices": "nnz", "code_values": "nnz"}[name]
    counts = zarr.open_array(str(path / count), mode="r")[start : 2 * start].sum(axis=1)
    first = int(counts[: row - start].sum())
    assert counts[row - start] > 0
    return path / "shards" / "000001" / name / "c" / str(first // PLAN["ragged_chunk"])


def _rewrite_value(path: Path, row: int) -> None:
    """Another process's write: shard 1's token ids of ``row`` changed to valid, decodable, different values."""
    start = PLAN["rows_per_shard"]
    lengths = zarr.open_array(str(path / "lengths"), mode="r")[start : 2 * start].sum(axis=1)
    first = int(lengths[: row - start].sum())
    ids = zarr.open_array(str(path / "shards" / "000001" / "token_ids"), mode="r+")
    ids[first] = ids[first] + 1


@pytest.mark.parametrize("evict", [False, True], ids=["cached", "evicted"])
@pytest.mark.parametrize("damage", ["flip", "rewrite"])
def test_a_change_after_the_check_stops_the_same_handle(clean_store, tmp_path, damage, evict):
    """One handle reads shard 1 (checked, rows right); then its bytes change on disk; the same handle's next read of
    those rows raises ShardCorruptError naming the shard and the array — whether the shard's index is still in the
    LRU or was evicted since (a real eviction: an LRU of one shard and a read of another)."""
    path = _copy(clean_store, tmp_path)
    expected = clean_store[1]
    rows = _shard_rows(expected, 1)
    store = open_store(str(path))
    assert_rows_equal(store.read_rows(rows), rows, expected, False)
    assert_rows_equal(store.read_rows(rows[:2]), rows[:2], expected, False)  # unchanged: still fine
    target = rows[len(rows) // 2]
    if damage == "flip":
        _flip_byte(_flat_chunk_of(path, target))
    else:
        _rewrite_value(path, target)
    if evict:
        store._INDEX_CACHE_SHARDS = 1
        other = _shard_rows(expected, 0)[:2]
        assert_rows_equal(store.read_rows(other), other, expected, False)  # shard 1 leaves the LRU
        assert 1 not in store._index_cache
    with pytest.raises(ShardCorruptError) as err:
        store.read_rows([target])
    msg = str(err.value)
    assert "shard 1 (rows 20..39)" in msg and "token_ids" in msg and f"verify {path}" in msg and "\n" not in msg, msg
    assert "changed after this process checked it" in msg
    with pytest.raises(ShardCorruptError):  # and it keeps refusing
        store.read_rows([target])
    with pytest.raises(ShardCorruptError):  # as does a fresh handle (the full check)
        open_store(str(path)).read_rows([target])


def test_a_per_row_chunk_swapped_after_eviction_is_caught(clean_store, tmp_path):
    """The per-row region is re-read after an eviction: a chunk swapped for another valid one (decodes fine) there
    is caught against the digests of what passed, named by array and rows."""
    path = _copy(clean_store, tmp_path)
    expected = clean_store[1]
    rows = _shard_rows(expected, 1)
    store = open_store(str(path))
    store._INDEX_CACHE_SHARDS = 1
    store.read_rows(rows)
    (path / "logp_sum/c/2/0").write_bytes((path / "logp_sum/c/3/0").read_bytes())  # rows 20..29 <- rows 30..39
    store.read_rows(_shard_rows(expected, 0)[:1])  # evicts shard 1
    with pytest.raises(ShardCorruptError, match=r"shard 1 \(rows 20\.\.39\).*logp_sum: rows 20\.\.29 differ"):
        store.read_rows(rows[:1])


def test_unverified_handles_read_what_is_there(clean_store, tmp_path):
    """``verify_reads=False`` (tools that read what may be damaged on purpose) returns the changed value: the
    damage above is real, and only the check stops it."""
    path = _copy(clean_store, tmp_path)
    rows = _shard_rows(clean_store[1], 1)
    store = open_store(str(path), verify_reads=False)
    before = store.read_rows(rows)
    _rewrite_value(path, rows[0])
    after = store.read_rows(rows)
    assert after.prompt_ids[0][0] == before.prompt_ids[0][0] + 1 or after.chosen_ids[0][0] == \
        before.chosen_ids[0][0] + 1


def _put_store(local: Path, moto_s3, name: str = "store") -> tuple[str, dict]:
    import s3fs

    fs = s3fs.S3FileSystem(**moto_s3.options(), skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(local), f"{BUCKET}/{name}", recursive=True)
    assert fs.exists(f"{BUCKET}/{name}/shards/000001/token_ids/zarr.json")
    return f"s3://{BUCKET}/{name}", fs


def test_each_shard_is_read_once(clean_store, moto_s3):
    """Verify on read costs one read of the shard, not two: the server's request log shows each object of shard 1
    (its per-row chunks and every flat array's chunks) fetched exactly once by a call that reads all its rows,
    and the rows are right.  A second call re-reads only chunks it needs (each checked again)."""
    url, fs = _put_store(clean_store[0], moto_s3)
    expected = clean_store[1]
    rows = _shard_rows(expected, 1)
    store = open_store(url, storage_options=moto_s3.options())
    moto_s3.record()
    assert_rows_equal(store.read_rows(rows, extras=True), rows, expected, True)
    gets = [r.split(" ", 1)[1].split("?")[0] for r in moto_s3.requests if r.startswith("GET ")]
    prefix = f"/{BUCKET}/store/"
    flat = sorted(k.removeprefix(f"{BUCKET}/store/") for k in fs.find(f"{BUCKET}/store/shards/000001")
                  if "/c/" in k)
    per_row = sorted(f"{name}/c/{c}" + ("/0" if name in ("uid", "lengths", "logp_sum", "n_tokens", "nnz",
                                                         "tok_nnz") else "")
                     for name in ("status", "uid", "lengths", "logp_sum", "n_tokens", "nnz", "tok_nnz")
                     for c in (2, 3))
    chunk_gets = sorted(g.removeprefix(prefix) for g in gets if "/c/" in g and g.startswith(prefix)
                        and not g.startswith((f"{prefix}shard_state/", f"{prefix}shard_checksum/")))
    assert len(flat) > 7  # several chunks per flat array (ragged_chunk = 64 elements)
    assert chunk_gets == sorted(flat + per_row), chunk_gets
    moto_s3.requests.clear()
    store.read_rows(rows[:1])  # in the LRU: its flat chunks only, each once
    again = [g for g in moto_s3.requests if g.startswith("GET ") and "/c/" in g]
    assert again and all("/shards/000001/" in g for g in again) and len(again) == len(set(again))


# ------------------------------------------------------------------------------------------------ transient I/O

FAST = RetryPolicy(attempts=3, first_delay_s=0.05, max_delay_s=0.1, deadline_s=5)


def _s3_options(moto_s3) -> dict:
    """botocore's own retries off, so that the store's retry policy is what rides out the outage (fresh dicts:
    botocore rewrites them)."""
    return moto_s3.options(config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5})


def test_a_read_rides_out_a_storage_restart(clean_store, moto_s3, caplog):
    """The S3 server stops under an open handle, and starts again 1.5 s later while a read is retrying: the read
    returns the right rows, having waited (each retry logged as a transient I/O error)."""
    url, _ = _put_store(clean_store[0], moto_s3)
    expected = clean_store[1]
    patient = RetryPolicy(attempts=40, first_delay_s=0.1, max_delay_s=0.4, deadline_s=30)
    store = open_store(url, storage_options=_s3_options(moto_s3), retry=patient)
    first = _shard_rows(expected, 0)
    assert_rows_equal(store.read_rows(first), first, expected, False)
    moto_s3.stop()
    restart = threading.Timer(1.5, moto_s3.start)
    restart.start()
    rest = _shard_rows(expected, 1) + _shard_rows(expected, 2)
    t0 = time.monotonic()
    try:
        with caplog.at_level("WARNING", logger="fpo_dist.store.cache_store"):
            batch = store.read_rows(rest + first[:1])
    finally:
        restart.join()
    assert time.monotonic() - t0 >= 1.0  # it waited for the server
    assert_rows_equal(batch, rest + first[:1], expected, False)
    assert any("transient I/O error" in r.getMessage() and "EndpointConnectionError" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_the_loader_rides_out_a_storage_restart(clean_store, moto_s3, caplog):
    """The trainer's path: a CacheLoader (prefetch thread, its own handle reopened with the given store's retry
    policy) streams from S3; the server stops after the first micro-batch and is back 1.5 s later.  Every micro-batch
    equals the one streamed from the local copy, and the outage was met (retries logged)."""
    import torch

    from fpo_dist.loader import CacheLoader

    url, _ = _put_store(clean_store[0], moto_s3)
    kw = dict(micro_batch_size=4, grad_accum=1, world_size=1, rank=0, seed=3, pad_id=0, prefetch=2)
    with CacheLoader(str(clean_store[0]), **kw) as local:
        want = list(local)
    patient = RetryPolicy(attempts=40, first_delay_s=0.1, max_delay_s=0.4, deadline_s=30)
    handle = open_store(url, storage_options=_s3_options(moto_s3), retry=patient)
    with caplog.at_level("WARNING", logger="fpo_dist.store.cache_store"), CacheLoader(handle, **kw) as loader:
        batches = iter(loader)
        got = [next(batches)]
        moto_s3.stop()
        restart = threading.Timer(1.5, moto_s3.start)
        restart.start()
        try:
            got += list(batches)
        finally:
            restart.join()
    assert len(got) == len(want) > 3
    for a, b in zip(got, want):
        assert a.rows.tolist() == b.rows.tolist() and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.ref_logp_sum, b.ref_logp_sum) and torch.equal(a.ref_codes_chosen.values,
                                                                           b.ref_codes_chosen.values)
    assert any("transient I/O error" in r.getMessage() for r in caplog.records)


def test_a_storage_that_stays_down_is_an_io_error_not_corruption(clean_store, moto_s3):
    """The server stops and stays down: opening the store and reading rows from an open handle each fail, within the
    retry bound, with a StoreIOError naming the I/O error and the key — not 'corrupted', no advice to overwrite."""
    url, _ = _put_store(clean_store[0], moto_s3)
    rows = _shard_rows(clean_store[1], 1)
    store = open_store(url, storage_options=_s3_options(moto_s3), retry=FAST)
    moto_s3.stop()
    for attempt in (lambda: store.read_rows(rows),
                    lambda: open_store(url, storage_options=_s3_options(moto_s3), retry=FAST)):
        t0 = time.monotonic()
        with pytest.raises(StoreIOError) as err:
            attempt()
        assert time.monotonic() - t0 < 30  # 3 tries, connection refused at once (slack for a busy host)
        msg = str(err.value)
        assert "transient I/O error (3 attempts" in msg and "EndpointConnectionError" in msg, msg
        assert url in msg and "corrupt" not in msg.lower() and "overwrite" not in msg and "rebuild" not in msg, msg


@pytest.mark.parametrize("exc, transient", [
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    (OSError(errno.EBUSY, "SlowDown"), True),  # s3fs's translation of S3's 503 / SlowDown
    (OSError(errno.EREMOTEIO, "InternalError"), True),  # ... and of a 500
    (FileNotFoundError(errno.ENOENT, "no such key"), False),
    (PermissionError(errno.EACCES, "denied"), False),
    (ValueError("Expecting value: line 1 column 1"), False),  # undecodable JSON
    (RuntimeError("error during blosc decompression: -1"), False),  # undecodable chunk
])
def test_only_unparseable_bytes_are_called_corrupted(exc, transient):
    """The one mapping (schema.unreadable): an I/O error reads as one (transient or not), with no advice to rebuild;
    undecodable bytes read as corrupted; a missing file as missing."""
    from fpo_dist.store.schema import is_transient, unreadable

    assert is_transient(exc) is transient
    msg = str(unreadable("/data/store", "status", exc))
    if isinstance(exc, (ValueError, RuntimeError)):
        assert "corrupted or truncated" in msg and "--overwrite true" in msg
    elif isinstance(exc, FileNotFoundError):  # a lost file is damage (an interrupted copy), named as missing
        assert "/data/store/status is missing" in msg and "corrupt" not in msg
    else:
        assert "corrupt" not in msg and "overwrite" not in msg, msg
    if transient:
        assert "transient I/O error" in msg and type(exc).__name__ in msg


def test_botocore_errors_are_classified_without_importing_them_here():
    """The exceptions s3fs lets through from botocore: a refused connection and a throttling answer are transient,
    an access error is not."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from fpo_dist.store.schema import is_transient

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    assert is_transient(slow)
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert not is_transient(denied)
    wrapped = OSError(errno.EIO, "wrapped")
    wrapped.__cause__ = slow
    assert is_transient(wrapped)
    assert np.isclose(RetryPolicy(first_delay_s=0.5, max_delay_s=2).delay(3), 2.0)
