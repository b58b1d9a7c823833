"""Checkpoints of a training run: where they live, what a resumed run must share with one, and RNG state.

Layout under ``<output_dir>/checkpoints/``: ``step_N/`` (DeepSpeed engine state, ``rng_rank{r}.pt`` per rank and
``fpo_state.json`` — step, world size, loader state and the run's settings, readable before the engine exists),
``step_N_universal/`` (converted for another world size) and ``latest`` (the tag of the last COMPLETE checkpoint:
written, atomically, only after every rank's files and the state file are in place, so a kill at any moment leaves
the previous checkpoint as the one ``--resume auto`` takes).

Durability: every rank fsyncs the files of the checkpoint it wrote (``sync_tree``) before the barrier that lets
rank 0 commit; the state file and ``latest`` are each written to a temporary file, fsynced, renamed over, and their
directory fsynced (``write_atomic``), so after a node crash ``latest`` names a checkpoint whose bytes are on disk.
A checkpoint is *committed* when its state file exists; retention counts committed checkpoints only, so a partial
directory left by a killed run (from a later step than the one resumed) can never push out the one just committed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fpo_dist.config import ConfigError, TrainConfig, mask_text, to_dict

CHECKPOINTS = "checkpoints"
STATE_FILE = "fpo_state.json"


def resume_target(cfg: TrainConfig, log=print) -> tuple[str, str, dict] | None:
    """``(directory, tag, its state file)`` of the checkpoint ``cfg.resume`` names, or None.  The state file holds
    the world size it was saved with, its ZeRO stage, the optimizer's parameter names (``optimizer_params``) and its
    step count (``optimizer_step``; both absent from checkpoints written before they were recorded)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        root = Path(cfg.output_dir) / CHECKPOINTS
        latest = root / "latest"
        if not latest.exists():
            log(f"resume auto: no checkpoint under {root}; starting fresh")
            return None
        load_dir, tag = root, latest.read_text().strip()
    else:
        path = Path(cfg.resume)
        load_dir, tag = path.parent, path.name
    meta = load_dir / tag / STATE_FILE
    if not meta.exists():
        raise ConfigError(f"{load_dir / tag} is not a complete fpo-dist checkpoint (no {STATE_FILE})")
    saved = json.loads(meta.read_text())
    now = resume_fields(cfg)
    diffs = [f"{k}: checkpoint {saved['run'].get(k)!r}, this run {v!r}" for k, v in now.items()
             if k in saved.get("run", {}) and saved["run"][k] != v]
    if diffs:
        raise ConfigError(f"resuming {load_dir / tag} with different settings would continue another "
                          "experiment:\n  " + "\n  ".join(diffs))
    return str(load_dir), tag, saved


def commit(root: Path, tag: str, meta: dict, keep_last: int) -> None:
    """On rank 0, after every rank saved (and fsynced) ``tag``: write its state file, then ``latest``; drop old
    checkpoints — of the committed ones, all but the newest ``keep_last``, never ``tag`` itself."""
    write_atomic(root / tag / STATE_FILE, json.dumps(meta, indent=1))
    write_atomic(root / "latest", tag)  # only now is the checkpoint complete (a kill before: the last one)
    for old in stale_checkpoints(root, tag, keep_last):
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def stale_checkpoints(root: Path, current: str, keep_last: int) -> list[Path]:
    """The checkpoints retention removes once ``current`` is committed: committed ones (with a state file) other than
    ``current`` beyond the newest ``keep_last`` counting ``current``, plus partial directories (no state file) of
    EARLIER steps than ``current`` (a kill's leftovers). A partial directory of a later step is left alone: it is the
    leftover of the run this one resumed, and the save of that step overwrites it."""
    def step(p: Path) -> int:
        return int(p.name.split("_")[1])

    dirs = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    now = step(root / current)
    committed = sorted((p for p in dirs if (p / STATE_FILE).exists() and p.name != current), key=step)
    keep = max(keep_last - 1, 0)  # ``current`` is one of the kept
    older = [p for p in committed if step(p) < now]
    stale = older[:max(len(older) - keep, 0)]
    partial = [p for p in dirs if not (p / STATE_FILE).exists() and step(p) < now and p.name != current]
    return sorted(stale + partial, key=step)


def rng_file(directory: str | Path, tag: str, rank: int) -> Path:
    return Path(directory) / tag / f"rng_rank{rank}.pt"


def resume_fields(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint it continues."""
    out = {f"loss.{k}": v for k, v in to_dict(cfg.loss).items()}
    out.update({f"optim.{k}": list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg.optim).items()})
    out.update({f"policy.lora.{k}": v for k, v in to_dict(cfg.policy.lora).items()})
    out.update(cache=mask_text(cfg.cache), seed=cfg.seed, epochs=cfg.epochs)  # written to fpo_state.json: no userinfo
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill or a node crash at any moment leaves the old content or the new,
    never a part or an empty file: the bytes are fsynced before the rename, and the directory after it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sync_tree(directory: str | Path) -> None:
    """fsync every file under ``directory`` and the directories themselves (each rank, for the checkpoint files it
    wrote, before rank 0 may commit them: on a shared filesystem only the writer's own fsync flushes its pages)."""
    for dirpath, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def get_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
