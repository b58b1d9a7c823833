"""Checkpoints of a training run: where they live, what a resumed run must share with one, and RNG state.

Layout under ``<output_dir>/checkpoints/``: ``step_N/`` (DeepSpeed engine state, ``rng_rank{r}.pt`` per rank and
``fpo_state.json`` — step, world size, loader state and the run's settings, readable before the engine exists),
``step_N_universal/`` (converted for another world size) and ``latest`` (the tag of the last COMPLETE checkpoint:
written, atomically, only after every rank's files and the state file are in place, so a kill at any moment leaves
the previous checkpoint as the one ``--resume auto`` takes).
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

from fpo_dist.config import ConfigError, TrainConfig, to_dict

CHECKPOINTS = "checkpoints"
STATE_FILE = "fpo_state.json"


def resume_target(cfg: TrainConfig, log=print) -> tuple[str, str, int] | None:
    """``(directory, tag, world size it was saved with)`` of the checkpoint ``cfg.resume`` names, or None."""
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
    return str(load_dir), tag, int(saved["world_size"])


def commit(root: Path, tag: str, meta: dict, keep_last: int) -> None:
    """On rank 0, after every rank saved ``tag``: write its state file, then ``latest``; drop old checkpoints."""
    write_atomic(root / tag / STATE_FILE, json.dumps(meta, indent=1))
    write_atomic(root / "latest", tag)  # only now is the checkpoint complete (a kill before: the last one)
    tags = sorted((p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)),
                  key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def rng_file(directory: str | Path, tag: str, rank: int) -> Path:
    return Path(directory) / tag / f"rng_rank{rank}.pt"


def resume_fields(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint it continues."""
    out = {f"loss.{k}": v for k, v in to_dict(cfg.loss).items()}
    out.update({f"optim.{k}": list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg.optim).items()})
    out.update({f"policy.lora.{k}": v for k, v in to_dict(cfg.policy.lora).items()})
    out.update(cache=cfg.cache, seed=cfg.seed, epochs=cfg.epochs)
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill at any moment leaves the old content or the new, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
