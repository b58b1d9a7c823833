"""Rank-aware deterministic sampling from the reference cache, streamed with a prefetch thread.

Sample order (independent of the world size)::

    order_e = np.random.default_rng([seed, e]).permutation(ok_rows)        # epoch e, all ok rows

One optimizer step consumes ``G = micro_batch_size * grad_accum * world_size`` consecutive samples of
``order_e``.  A step that starts at position ``p`` of the epoch order gives rank ``r`` at micro-step ``m``::

    order_e[p + m * (micro * world) + r * micro : ... + micro]                # Topology.micro_slice

so the union over ranks of one step is exactly ``order_e[p : p + G]``.  Steps start at ``p = 0, G, 2G, ...``;
an epoch has ``steps_per_epoch = n_ok // G`` steps and the last ``n_ok % G`` samples of ``order_e`` are not used
in that epoch (``dropped_per_epoch``, logged at start; the next epoch reshuffles, so no row is dropped twice
on purpose).

Loader state is ``(epoch, consumed_samples)``: global counts of samples in the epoch order, so it means the same
thing under any world size or micro/accum split.  A resumed run continues at position ``consumed_samples`` of
the same order: with the same ``G`` exactly where it stopped; with another ``G`` it takes steps of the new ``G``
from that position (steps never overlap; the epoch's tail is ``(n_ok - consumed) % G_new`` samples).

The state advances when the CONSUMER has received the last micro-batch of a step: micro-batches read ahead by
the prefetch thread are not counted, nor are those of a step not yet finished.  The trainer takes
``state_dict()`` after its optimizer step; a state taken mid-step resumes at the start of that step.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fpo_dist.lm_head import RefTopM
from fpo_dist.logprobs import Selection
from fpo_dist.losses import SparseCodes
from fpo_dist.models import LAYOUTS, PairBatch, build_batch, pairs_from_batch
from fpo_dist.store import CacheStore, Csr, RowBatch, open_store

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 30.0  # close(): the producer finishes at most the micro-batch it is reading


# ---------------------------------------------------------------------------------------------------------
# Sampling: pure numpy
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """All rank arithmetic of the loader: which positions of an epoch's order rank ``rank`` reads."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: ``micro_batch_size * grad_accum * world_size``."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    def micro_slice(self, step_start: int, micro_step: int) -> slice:
        """Positions in the epoch order of this rank's micro-batch ``micro_step`` of the step at ``step_start``."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} is outside [0, grad_accum={self.grad_accum})")
        a = step_start + micro_step * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
        return slice(a, a + self.micro_batch_size)


class SampleOrder:
    """The deterministic global order of the ok rows per epoch, and the step grid over it."""

    def __init__(self, ok_rows: np.ndarray, seed: int):
        ok_rows = np.asarray(ok_rows, dtype=np.int64).reshape(-1)
        if len(ok_rows) and (np.diff(ok_rows) <= 0).any():
            raise ValueError("ok_rows must be sorted and unique")
        self.ok_rows = ok_rows
        self.seed = int(seed)

    @property
    def n(self) -> int:
        return len(self.ok_rows)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The ok rows in epoch ``epoch``'s order: ``default_rng([seed, epoch]).permutation(ok_rows)``."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.ok_rows)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.n // global_batch

    def dropped_per_epoch(self, global_batch: int) -> int:
        return self.n % global_batch

    def normalize(self, epoch: int, consumed: int, global_batch: int) -> tuple[int, int]:
        """``(epoch, consumed)``, moved to the start of the next epoch when no full step is left in this one."""
        if not 0 <= consumed <= self.n:
            raise ValueError(f"consumed_samples {consumed} is outside [0, {self.n}] (ok rows of the store)")
        return (epoch + 1, 0) if self.n - consumed < global_batch else (epoch, consumed)

    def step_starts(self, consumed: int, global_batch: int) -> range:
        """Start positions of the remaining steps of an epoch resumed at ``consumed``: never overlapping."""
        return range(consumed, self.n - global_batch + 1, global_batch)


# ---------------------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of ``B`` pairs for one rank, laid out by :func:`fpo_dist.models.build_batch` (the token
    fields are those of its :class:`~fpo_dist.models.PairBatch`, ``layout`` gives them back as one).

    Sequences ``[0, B)`` are ``prompt + chosen``, ``[B, 2B)`` ``prompt + rejected`` (padded: one row each;
    packed: back to back in one row; shared: ``[prompt, chosen, rejected]`` per pair, back to back in one row);
    the reference data is per pair, column 0 = chosen, 1 = rejected.
    """

    input_ids: torch.Tensor  # [R, T] int64 (padded: [2B, T]; packed, shared: [1, Σ len])
    attention_mask: torch.Tensor | None  # [R, T] int64 (padded); None (packed, shared)
    response_mask: torch.Tensor  # [R, T] bool
    ref_logp_sum: torch.Tensor  # [B, 2] float32
    ref_n_tokens: torch.Tensor  # [B, 2] int64
    ref_codes_chosen: SparseCodes
    ref_codes_rejected: SparseCodes
    uids: list[str]  # 32-char hex content hash per pair
    rows: np.ndarray  # int64 [B], global source-row indices
    epoch: int
    step_in_epoch: int  # sample_offset // global_batch (the step index when G never changed)
    micro_step: int  # in [0, grad_accum)
    sample_offset: int  # position in the epoch order where this micro-batch's step starts
    is_step_end: bool  # last micro-step of the step: the trainer steps the optimizer after it
    position_ids: torch.Tensor | None = None  # [R, T] int64 (packed): each sequence's own positions
    # [R, T] int64: the sequence of each position, -1 on padding; None: the padded layout's (row r = sequence r)
    sequence_ids: torch.Tensor | None = None
    shared: Selection | None = None  # the shared layout's scored positions (PairBatch.shared)
    # the cache's top-M reference distributions of every response token, sequence by sequence (chosen rows, then
    # rejected rows; each response's tokens in order): the order of every layout's selected positions
    ref_topm: RefTopM | None = None

    def __post_init__(self) -> None:
        if self.sequence_ids is None:
            if self.attention_mask is None:
                raise ValueError("a packed MicroBatch (attention_mask None) needs its sequence_ids")
            rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[:, None]
            object.__setattr__(self, "sequence_ids", torch.where(self.attention_mask.bool(), rows, -1))

    @property
    def n_pairs(self) -> int:
        return len(self.rows)

    @property
    def layout(self) -> PairBatch:
        """The token fields as a :class:`~fpo_dist.models.PairBatch`."""
        return PairBatch(self.input_ids, self.attention_mask, self.response_mask, self.sequence_ids,
                         2 * self.n_pairs, self.position_ids, self.shared)

    @property
    def padding_tokens(self) -> int:
        """Positions computed for no sequence (0 when packed)."""
        return self.layout.padding_tokens

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        move = lambda t: t if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask),
            sequence_ids=move(self.sequence_ids),
            position_ids=move(self.position_ids),
            shared=move(self.shared),
            ref_topm=move(self.ref_topm),
            ref_logp_sum=move(self.ref_logp_sum),
            ref_n_tokens=move(self.ref_n_tokens),
            ref_codes_chosen=SparseCodes(*(move(t) for t in _fields(self.ref_codes_chosen))),
            ref_codes_rejected=SparseCodes(*(move(t) for t in _fields(self.ref_codes_rejected))),
        )


def _fields(codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return codes.offsets, codes.indices, codes.values


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _sparse(csr: Csr) -> SparseCodes:
    return SparseCodes(_tensor(csr.offsets.astype(np.int64, copy=False)), _tensor(csr.indices), _tensor(csr.values))


def make_micro_batch(batch: RowBatch, pad_id: int, layout: str = "padded", **position: Any) -> MicroBatch:
    """Tensors for the rows of ``batch`` in ``layout`` (from the cached tokens: training never re-tokenizes)."""
    pb = build_batch(pairs_from_batch(batch), pad_id, layout)
    return MicroBatch(
        input_ids=pb.input_ids,
        attention_mask=pb.attention_mask,
        response_mask=pb.response_mask,
        sequence_ids=pb.sequence_ids,
        position_ids=pb.position_ids,
        shared=pb.shared,
        ref_logp_sum=_tensor(batch.logp_sum.astype(np.float32, copy=False)),
        ref_n_tokens=_tensor(batch.n_tokens.astype(np.int64)),
        ref_codes_chosen=_sparse(batch.chosen_codes),
        ref_codes_rejected=_sparse(batch.rejected_codes),
        uids=[u.tobytes().hex() for u in batch.uid],
        rows=np.asarray(batch.index, dtype=np.int64),
        ref_topm=cached_topm(batch),
        **position,
    )


def cached_topm(batch: RowBatch) -> RefTopM | None:
    """The rows' cached top-M distributions as one :class:`~fpo_dist.lm_head.RefTopM`, in sequence order."""
    if batch.chosen_ref_topm is None:
        return None
    parts = [*batch.chosen_ref_topm, *batch.rejected_ref_topm]
    return RefTopM(_tensor(np.concatenate([t.ids for t in parts])).long(),
                   _tensor(np.concatenate([t.logps for t in parts])), _tensor(np.concatenate([t.tail for t in parts])))


def _read_micro_batches(
    store: CacheStore,
    order: SampleOrder,
    topo: Topology,
    pad_id: int,
    layout: str,
    epochs: int,
    epoch: int,
    consumed: int,
    stop: threading.Event | None,
    ref_topm: bool = False,
) -> Iterator[MicroBatch]:
    """This rank's micro-batches from the (normalized) position ``(epoch, consumed)`` to the end of ``epochs``."""
    G = topo.global_batch
    for e in range(epoch, epochs):
        rows = order.epoch_order(e)
        for p in order.step_starts(consumed if e == epoch else 0, G):
            for m in range(topo.grad_accum):
                if stop is not None and stop.is_set():
                    return
                # read_rows reads the rows in sorted order (one slice per run of consecutive rows) and returns
                # them in the order asked.
                batch = store.read_rows(rows[topo.micro_slice(p, m)], ref_topm=ref_topm)
                yield make_micro_batch(batch, pad_id, layout, epoch=e, step_in_epoch=p // G, micro_step=m, sample_offset=p,
                                       is_step_end=m == topo.grad_accum - 1)


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _stop_producer(stop: threading.Event) -> None:
    stop.set()


class CacheLoader:
    """Iterates this rank's micro-batches, in order, from ``start_state`` to the end of epoch ``epochs - 1``.

    ``store`` is a path/URL (opened with fsspec ``storage_options``) or a :class:`CacheStore` (reopened with its
    own options and retry policy); the loader opens its own read handle (the prefetch thread never shares one with the caller).  ``ok_rows`` (unique, all ok; sorted here) restricts training to a subset;
    by default every ok row of the store.  ``prefetch`` micro-batches are read ahead by a background thread
    (0: read in the consumer's thread).  ``iter(loader)`` is the loader itself: a new ``for`` loop continues where
    the last one stopped.  Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        store: str | CacheStore,
        *,
        micro_batch_size: int | None = None,
        grad_accum: int | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        topology: Topology | None = None,
        seed: int,
        pad_id: int,
        layout: str = "padded",
        ok_rows: np.ndarray | None = None,
        epochs: int = 1,
        prefetch: int = 2,
        start_state: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        ref_topm: bool = False,
    ):
        retry = None
        if isinstance(store, CacheStore):
            store, storage_options, retry = store.path, store.storage_options, store.retry
        # its own handle: verify on read checks every shard it touches, and every later read against what passed;
        # a transient I/O error is retried (the handle's RetryPolicy), then raised as StoreIOError
        self.store = open_store(str(store), storage_options=storage_options, retry=retry)
        if not self.store.attrs.get("complete"):
            raise ValueError(f"cache store {self.store.path} is not finalized: finish the cache job (a rerun "
                             "resumes its committed shards) before training on it")
        store_ok = self.store.ok_rows()
        if ok_rows is None:
            ok_rows = store_ok
        else:
            ok_rows = np.asarray(ok_rows, dtype=np.int64).reshape(-1)
            if len(np.unique(ok_rows)) != len(ok_rows):
                raise ValueError("ok_rows holds duplicates")
            ok_rows = np.sort(ok_rows)
            not_ok = ok_rows[~np.isin(ok_rows, store_ok)]
            if len(not_ok):
                raise ValueError(f"{len(not_ok)} of the given ok_rows are not ok in {self.store.path}: "
                                 f"{not_ok[:10].tolist()}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")

        self.topology = topology or Topology(micro_batch_size, grad_accum, world_size, rank)
        micro_batch_size, grad_accum, world_size, rank = (
            self.topology.micro_batch_size, self.topology.grad_accum, self.topology.world_size, self.topology.rank)
        self.order = SampleOrder(ok_rows, seed)
        self.pad_id = int(pad_id)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.ref_topm = ref_topm  # also read the cache's top-M reference distributions (offline TDPO)
        self.epochs = epochs
        self.prefetch = prefetch
        G = self.topology.global_batch
        if self.order.n < G:
            raise ValueError(f"{self.order.n} ok rows are fewer than one global batch "
                             f"(micro {micro_batch_size} x accum {grad_accum} x world {world_size} = {G})")
        if rank == 0:
            logger.info("loader: %d ok rows, global batch %d: %d steps per epoch, %d rows unused per epoch",
                        self.order.n, G, self.steps_per_epoch, self.dropped_per_epoch)

        self._epoch, self._consumed = 0, 0  # consumer-side state, normalized
        self._micro_next = 0  # next micro-step the consumer expects within the current step
        self._source: Iterator | None = None  # micro-batches (prefetch 0) or the prefetch queue's reader
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._queue: queue.Queue | None = None
        self._finalizer: weakref.finalize | None = None
        if start_state is not None:
            self.load_state_dict(start_state)

    # ------------------------------------------------------------------ sizes

    @property
    def seed(self) -> int:
        return self.order.seed

    @property
    def global_batch(self) -> int:
        return self.topology.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch(self.global_batch)

    @property
    def dropped_per_epoch(self) -> int:
        """Ok rows not used in an epoch (the tail of its order that does not fill a global batch)."""
        return self.order.dropped_per_epoch(self.global_batch)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a run from the start to the end of ``epochs``."""
        return self.epochs * self.steps_per_epoch

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Position after the last full step the consumer received (see the module docstring)."""
        return {"epoch": self._epoch, "consumed_samples": self._consumed, "seed": self.seed,
                "global_batch": self.global_batch, "n_ok": self.order.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position.  Stops read-ahead; the next micro-batch comes from the new position.

        The seed and the set of ok rows must match (else the order differs and samples would repeat or be
        skipped); ``global_batch`` may differ (the run continues with steps of the new size).
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']} but this loader has seed {self.seed}: "
                             "the sample order would differ; resume with the same seed")
        if "n_ok" in state and int(state["n_ok"]) != self.order.n:
            raise ValueError(f"loader state was saved over {state['n_ok']} ok rows, this loader has {self.order.n}: "
                             "resume on the same cache store and row subset")
        if int(state["global_batch"]) != self.global_batch:
            logger.warning("loader: resuming at sample %d of epoch %d with global batch %d (state saved with %d)",
                           state["consumed_samples"], state["epoch"], self.global_batch, state["global_batch"])
        epoch, consumed = int(state["epoch"]), int(state["consumed_samples"])
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._shutdown()
        self._epoch, self._consumed = self.order.normalize(epoch, consumed, self.global_batch)
        self._micro_next = 0

    # ------------------------------------------------------------------ iteration

    def _micro_batches(self, stop: threading.Event | None) -> Iterator[MicroBatch]:
        # Only what the reader needs, not ``self``: a thread holding the loader would keep it alive.
        return _read_micro_batches(self.store, self.order, self.topology, self.pad_id, self.layout, self.epochs,
                                   self._epoch, self._consumed, stop, self.ref_topm)

    def _start(self) -> None:
        if self.prefetch == 0:
            self._source = self._micro_batches(None)
            return
        stop, q = threading.Event(), queue.Queue(maxsize=self.prefetch)
        source = self._micro_batches(stop)

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for mb in source:
                    if not put(mb):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 — handed to the consumer, which re-raises it
                put(_Failure(e))

        def consume() -> Iterator[MicroBatch]:
            while True:
                try:
                    item = q.get(timeout=1.0)
                except queue.Empty:
                    if thread.is_alive():
                        continue
                    try:  # it may have handed over its last item just before it ended
                        item = q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("loader prefetch thread ended without handing over a result") from None
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item

        thread = threading.Thread(target=produce, name=f"fpo-loader-prefetch-rank{self.topology.rank}", daemon=True)
        self._stop, self._queue, self._thread = stop, q, thread
        self._finalizer = weakref.finalize(self, _stop_producer, stop)  # a dropped loader stops its thread
        self._source = consume()
        thread.start()

    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> MicroBatch:
        if self._source is None:
            self._start()
        try:
            mb = next(self._source)
        except BaseException:  # the end (StopIteration) or a reader error: stop the thread, then re-raise
            self._shutdown()
            raise
        self._advance(mb)
        return mb

    def _advance(self, mb: MicroBatch) -> None:
        """Check that ``mb`` is exactly the next micro-batch of the schedule; count a finished step."""
        expected = (self._epoch, self._consumed, self._micro_next)
        got = (mb.epoch, mb.sample_offset, mb.micro_step)
        if got != expected:
            raise RuntimeError(f"loader out of order: expected (epoch, offset, micro) {expected}, got {got}")
        self._micro_next += 1
        if self._micro_next == self.topology.grad_accum:
            self._micro_next = 0
            self._epoch, self._consumed = self.order.normalize(self._epoch, self._consumed + self.global_batch,
                                                               self.global_batch)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        """Stop and join the prefetch thread, drop read-ahead; the next ``next()`` restarts from the state."""
        thread, stop, q = self._thread, self._stop, self._queue
        self._source = self._thread = self._stop = self._queue = None
        self._micro_next = 0  # a partially received step is received again from its start
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if thread is None:
            return
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"loader prefetch thread did not stop within {_JOIN_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        """Stop the prefetch thread (joined).  Safe to call twice; iterating again restarts from the state."""
        self._shutdown()

    def __enter__(self) -> CacheLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
