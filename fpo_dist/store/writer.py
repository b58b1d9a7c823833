"""Building a shard in memory: :class:`ShardResult`, what a cache worker hands to :meth:`CacheStore.write_shard`.

A worker turns its per-pair outputs into one :class:`ShardResult` with :meth:`ShardResult.build`, which validates
them and lays them out exactly as ``docs/cache-format.md`` specifies: per-row arrays over every row of the shard
(bad rows keep their slot, with zero counts and NaN ``logp_sum``) and the shard's flat (ragged) arrays, rows in
row order, each row's segment the concatenation of its columns' segments.  :meth:`ShardResult.checksum` is the
shard checksum the driver later commits; ``verify`` recomputes it from the store.  Nothing here touches a store.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fpo_dist.data import BAD_REASONS, BadRow, TokenizedPair
from fpo_dist.store.schema import (
    STATUS_BAD_BASE,
    STATUS_NOT_WRITTEN,
    STATUS_OK,
    _cat,
    _shard_checksum,
)


@dataclass(frozen=True, eq=False)
class ShardResult:
    """Everything a worker produces for one shard: per-row arrays over all rows ``[start, stop)`` (bad rows
    included, with zero lengths / NaN logp_sum) and the shard's flat arrays.  Build it with :meth:`build`."""

    start: int
    stop: int
    rows: dict[str, np.ndarray]  # per-row arrays, each of length stop - start
    flat: dict[str, np.ndarray]  # flat shard arrays
    bad_rows: tuple[BadRow, ...]
    ref_topm: int = 0  # M of the top-M reference arrays (0: none)

    @classmethod
    def build(
        cls,
        start: int,
        stop: int,
        pairs: Sequence[TokenizedPair],
        bad: Sequence[BadRow],
        logp_sum: Any,
        n_tokens: Any,
        pooled_codes: Sequence[tuple[tuple[Any, Any], tuple[Any, Any]]],
        token_logps: Sequence[tuple[Any, Any]] | None = None,
        token_codes: Sequence[tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]] | None = None,
        ref_topm: Sequence[tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]] | None = None,
        topm: int = 0,
    ) -> ShardResult:
        """Assemble a shard from per-pair outputs.  Everything per pair is aligned with ``pairs`` and is a
        (chosen, rejected) couple:

        * ``logp_sum``: float [P, 2], summed reference log-prob of the response tokens;
        * ``n_tokens``: int [P, 2], the number of response tokens in that sum (≤ the response length);
        * ``pooled_codes``: per pair ``((idx_c, val_c), (idx_r, val_r))``, the non-zeros of the pooled SAE vector
          (stored sorted by feature index);
        * ``token_logps`` (option): per pair ``(logps_c, logps_r)`` with ``n_tokens`` entries each;
        * ``token_codes`` (option): per pair ``((nnz_c, idx_c, val_c), (nnz_r, idx_r, val_r))``, a CSR over the
          response's ``n_tokens`` tokens: ``nnz`` per token, then the concatenated indices and values;
        * ``ref_topm`` (option, with ``topm`` = M > 0): per pair ``((ids_c, logps_c, tail_c), (ids_r, …))``, per
          response token the reference's M most probable next tokens ``[n_tokens, M]`` (int), their log-probs
          ``[n_tokens, M]`` and the log of the remaining mass ``[n_tokens]``.

        Every row in ``[start, stop)`` must appear exactly once, in ``pairs`` or in ``bad``; order is free.
        """
        start, stop = int(start), int(stop)
        n, n_pairs = stop - start, len(pairs)
        if n < 1:
            raise ValueError(f"empty row range [{start}, {stop})")
        _check_coverage(start, stop, [p.index for p in pairs], [b.index for b in bad])
        logp_sum = _per_pair(logp_sum, "float32", "logp_sum", n_pairs)
        n_tokens = _per_pair(n_tokens, "int64", "n_tokens", n_pairs)
        if (ref_topm is not None) != (topm > 0):
            raise ValueError(f"ref_topm data and topm={topm} disagree: give both (M > 0) or neither")
        for name, value in (("pooled_codes", pooled_codes), ("token_logps", token_logps), ("token_codes", token_codes),
                            ("ref_topm", ref_topm)):
            if value is not None and (len(value) != n_pairs or any(len(v) != 2 for v in value)):
                raise ValueError(f"{name} must hold one (chosen, rejected) couple per pair ({n_pairs} pairs)")

        # Row order from here on; token_logps / token_codes stay in input order and are read through ``order``.
        order = sorted(range(n_pairs), key=lambda i: pairs[i].index)
        pairs = [pairs[i] for i in order]
        logp_sum, n_tokens = logp_sum[order], n_tokens[order]
        pooled_codes = [pooled_codes[i] for i in order]
        local = np.array([p.index - start for p in pairs], dtype=np.int64)

        status = _status(n, start, local, bad)
        uid = _uids(n, pairs, local)
        lengths, pair_lengths, token_ids = _tokens(n, pairs, local)
        _check_sums(pairs, logp_sum, n_tokens, pair_lengths)
        nnz, code_indices, code_values = _pooled(n, pairs, local, pooled_codes)
        rows = {"status": status, "uid": uid, "lengths": lengths, "logp_sum": _scatter(n, local, logp_sum, np.nan),
                "n_tokens": _scatter(n, local, n_tokens, 0, np.int32), "nnz": nnz}
        flat = {"token_ids": token_ids, "code_indices": code_indices, "code_values": code_values}
        if token_logps is not None:
            flat["token_logps"] = _token_logps(pairs, order, n_tokens, token_logps)
        if token_codes is not None:
            rows["tok_nnz"], tok_flat = _token_codes(n, pairs, order, local, n_tokens, token_codes)
            flat.update(tok_flat)
        if ref_topm is not None:
            rows["topm_n"] = rows["n_tokens"] * np.int32(topm)
            flat.update(_ref_topm(pairs, order, n_tokens, ref_topm, topm))
        return cls(start, stop, rows, flat, tuple(sorted(bad, key=lambda b: b.index)), topm)

    @property
    def options(self) -> dict[str, Any]:
        return {"token_logps": "token_logps" in self.flat, "token_codes": "tok_code_nnz" in self.flat,
                "ref_topm": self.ref_topm}

    def checksum(self) -> bytes:
        """sha256 over the canonical serialisation of everything this shard writes (see docs/cache-format.md)."""
        return _shard_checksum(self.start, self.stop, self.bad_rows, {**self.rows, **self.flat})


# --------------------------------------------------------------------------------------------- build steps
# ``pairs`` below are sorted by row index and ``local[j]`` is pair j's row within the shard.


def _per_pair(x: Any, dtype: str, what: str, n_pairs: int) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.size == 0 and n_pairs == 0:
        return a.reshape(0, 2)
    if a.shape != (n_pairs, 2):
        raise ValueError(f"{what}: expected shape ({n_pairs}, 2) (chosen, rejected per pair), got {a.shape}")
    return a


def _as_1d(x: Any, dtype: str, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {a.shape}")
    return a


def _side(side: int) -> str:
    return "chosen" if side == 0 else "rejected"


def _check_coverage(start: int, stop: int, ok: list[int], bad: list[int]) -> None:
    seen = np.array(ok + bad, dtype=np.int64)
    expected = np.arange(start, stop)
    if len(seen) == len(expected) and np.array_equal(np.sort(seen), expected):
        return
    counts = np.bincount(np.clip(seen - start, -1, stop - start) + 1, minlength=stop - start + 2)
    missing = (np.nonzero(counts[1:-1] == 0)[0] + start).tolist()
    duplicate = (np.nonzero(counts[1:-1] > 1)[0] + start).tolist()
    outside = sorted(set(seen[(seen < start) | (seen >= stop)].tolist()))
    raise ValueError(
        f"shard rows [{start}, {stop}) must each appear exactly once in pairs or bad rows: "
        f"missing {missing[:10]}, duplicated {duplicate[:10]}, outside the range {outside[:10]}"
    )


def _scatter(n: int, local: np.ndarray, values: np.ndarray, fill: Any, dtype: Any = np.float32) -> np.ndarray:
    """A per-row [n, 2] array: ``values`` at the pairs' rows, ``fill`` elsewhere (bad rows)."""
    out = np.full((n, 2), fill, dtype)
    out[local] = values
    return out


def _status(n: int, start: int, local: np.ndarray, bad: Sequence[BadRow]) -> np.ndarray:
    status = np.full(n, STATUS_NOT_WRITTEN, np.int8)
    status[local] = STATUS_OK
    for b in bad:
        if b.reason not in BAD_REASONS:
            raise ValueError(f"row {b.index}: unknown bad-row reason {b.reason!r}; known: {BAD_REASONS}")
        status[b.index - start] = STATUS_BAD_BASE + BAD_REASONS.index(b.reason)
    return status


def _uids(n: int, pairs: Sequence[TokenizedPair], local: np.ndarray) -> np.ndarray:
    uid = np.zeros((n, 16), np.uint8)
    for p in pairs:
        if not isinstance(p.uid, (bytes, bytearray)) or len(p.uid) != 16:
            raise ValueError(f"row {p.index}: uid must be 16 bytes, got {p.uid!r}")
    if pairs:
        uid[local] = np.frombuffer(b"".join(bytes(p.uid) for p in pairs), np.uint8).reshape(-1, 16)
    return uid


def _tokens(n: int, pairs: Sequence[TokenizedPair], local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-row ``lengths`` [n, 3], the pairs' lengths [P, 3], flat ``token_ids``: prompt, chosen, rejected)."""
    lengths = np.zeros((n, 3), np.int32)
    pair_lengths = np.array(
        [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], np.int64
    ).reshape(-1, 3)
    lengths[local] = pair_lengths
    token_ids = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs),
        dtype=np.int32,
        count=int(pair_lengths.sum()),
    )
    return lengths, pair_lengths, token_ids


def _check_sums(pairs: Sequence[TokenizedPair], logp_sum: np.ndarray, n_tokens: np.ndarray,
                pair_lengths: np.ndarray) -> None:
    """``n_tokens`` within the response lengths, ``logp_sum`` finite."""
    bad_tokens = np.nonzero((n_tokens < 0) | (n_tokens > pair_lengths[:, 1:]))[0]
    if len(bad_tokens):
        i = bad_tokens[0]
        raise ValueError(
            f"row {pairs[i].index}: n_tokens {n_tokens[i].tolist()} outside [0, response lengths "
            f"{pair_lengths[i, 1:].tolist()}]"
        )
    bad_logp = np.nonzero(~np.isfinite(logp_sum).all(axis=1))[0]
    if len(bad_logp):
        raise ValueError(f"row {pairs[bad_logp[0]].index}: logp_sum is not finite: {logp_sum[bad_logp[0]]}")


def _pooled(n: int, pairs: Sequence[TokenizedPair], local: np.ndarray,
            pooled_codes: Sequence[tuple[tuple[Any, Any], tuple[Any, Any]]]) -> tuple[np.ndarray, ...]:
    """(per-row ``nnz`` [n, 2], flat ``code_indices``, flat ``code_values``), each side sorted by feature index."""
    idx_parts, val_parts, nnz = [], [], np.zeros((n, 2), np.int32)
    for j, (p, codes) in enumerate(zip(pairs, pooled_codes)):
        for side, (idx, val) in enumerate(codes):
            what = f"row {p.index} {_side(side)} pooled codes"
            idx, val = _as_1d(idx, "int64", what), _as_1d(val, "float32", what)
            if len(idx) != len(val):
                raise ValueError(f"{what}: {len(idx)} indices but {len(val)} values")
            srt = np.argsort(idx, kind="stable")
            idx, val = idx[srt], val[srt]
            if len(idx) and (idx[0] < 0 or idx[-1] > np.iinfo(np.int32).max or (np.diff(idx) <= 0).any()):
                raise ValueError(f"{what}: indices must be unique and in [0, 2**31)")
            if not np.isfinite(val).all():
                raise ValueError(f"{what}: values are not finite")
            idx_parts.append(idx)
            val_parts.append(val)
            nnz[local[j], side] = len(idx)
    return nnz, _cat(idx_parts, "int32"), _cat(val_parts, "float32")


def _token_logps(pairs: Sequence[TokenizedPair], order: list[int], n_tokens: np.ndarray,
                 token_logps: Sequence[tuple[Any, Any]]) -> np.ndarray:
    """Flat ``token_logps``: per row, the chosen response's ``n_tokens`` log-probs, then the rejected one's."""
    parts = []
    for j, i in enumerate(order):
        for side, lp in enumerate(token_logps[i]):
            lp = _as_1d(lp, "float32", f"row {pairs[j].index} token_logps")
            if len(lp) != n_tokens[j, side]:
                raise ValueError(
                    f"row {pairs[j].index}: {len(lp)} token log-probs for n_tokens={n_tokens[j, side]}"
                )
            parts.append(lp)
    return _cat(parts, "float32")


def _token_codes(n: int, pairs: Sequence[TokenizedPair], order: list[int], local: np.ndarray,
                 n_tokens: np.ndarray, token_codes: Sequence[tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]],
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(per-row ``tok_nnz`` [n, 2], the flat ``tok_code_nnz`` / ``tok_code_indices`` / ``tok_code_values``)."""
    nnz_parts, idx_parts, val_parts = [], [], []
    tok_nnz = np.zeros((n, 2), np.int32)
    for j, i in enumerate(order):
        for side, (tnnz, idx, val) in enumerate(token_codes[i]):
            what = f"row {pairs[j].index} {_side(side)} token codes"
            tnnz = _as_1d(tnnz, "int64", what)
            idx, val = _as_1d(idx, "int32", what), _as_1d(val, "float32", what)
            if len(tnnz) != n_tokens[j, side] or (tnnz < 0).any() or not tnnz.sum() == len(idx) == len(val):
                raise ValueError(
                    f"{what}: need n_tokens={n_tokens[j, side]} per-token counts summing to the number of "
                    f"indices and values; got {len(tnnz)} counts summing to {tnnz.sum()}, "
                    f"{len(idx)} indices, {len(val)} values"
                )
            nnz_parts.append(tnnz)
            idx_parts.append(idx)
            val_parts.append(val)
            tok_nnz[local[j], side] = len(idx)
    flat = {"tok_code_nnz": _cat(nnz_parts, "int32"), "tok_code_indices": _cat(idx_parts, "int32"),
            "tok_code_values": _cat(val_parts, "float32")}
    return tok_nnz, flat


def _ref_topm(pairs: Sequence[TokenizedPair], order: list[int], n_tokens: np.ndarray,
              ref_topm: Sequence[tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]], m: int) -> dict[str, np.ndarray]:
    """Flat ``ref_topm_ids`` / ``ref_topm_logps`` (``n_tokens · M`` per response, row-major ``[token, rank]``) and
    ``ref_tail_logp`` (``n_tokens`` per response), chosen then rejected per row."""
    ids_parts, lp_parts, tail_parts = [], [], []
    for j, i in enumerate(order):
        for side, (ids, lps, tail) in enumerate(ref_topm[i]):
            what = f"row {pairs[j].index} {_side(side)} ref_topm"
            n = int(n_tokens[j, side])
            ids, lps = np.asarray(ids, dtype="int32"), np.asarray(lps, dtype="float32")
            tail = _as_1d(tail, "float32", what)
            if ids.shape != (n, m) or lps.shape != (n, m) or tail.shape != (n,):
                raise ValueError(f"{what}: need ids and log-probs of shape ({n}, {m}) (n_tokens, M) and {n} tail "
                                 f"log-masses; got {ids.shape}, {lps.shape}, {tail.shape}")
            ids_parts.append(ids.reshape(-1))
            lp_parts.append(lps.reshape(-1))
            tail_parts.append(tail)
    return {"ref_topm_ids": _cat(ids_parts, "int32"), "ref_topm_logps": _cat(lp_parts, "float32"),
            "ref_tail_logp": _cat(tail_parts, "float32")}
