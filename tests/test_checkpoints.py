"""Checkpoint commit: durable (fsync before ``latest`` moves, seen from outside with strace) and retention that counts
only committed checkpoints (a partial directory of a later step cannot push out the one just committed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fpo_dist.checkpoints import STATE_FILE, commit


def _committed(root: Path, step: int) -> None:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / STATE_FILE).write_text(json.dumps({"step": step}))


def _partial(root: Path, step: int) -> None:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")


def _saved(root: Path, step: int) -> str:
    """Every rank's files of ``step_N`` are written; only rank 0's commit is left."""
    d = root / f"step_{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"y")
    return d.name


def test_keep_last_1_after_resume_keeps_the_checkpoint_just_committed(tmp_path):
    """A run committed step_1, was killed inside the save of step_3 (partial directory), and is resumed from step_1
    with ``keep_last=1``; its save at step 2 commits step_2: step_2 stays and ``latest`` names it, step_1 goes, and the
    later partial step_3 (which this run's own save of step 3 will overwrite) does not count as a checkpoint."""
    root = tmp_path / "checkpoints"
    _committed(root, 1)
    _partial(root, 3)
    (root / "latest").write_text("step_1")
    commit(root, _saved(root, 2), {"step": 2}, keep_last=1)
    assert (root / "latest").read_text() == "step_2"
    assert (root / "step_2" / STATE_FILE).exists() and (root / "step_2" / "mp_rank_00_model_states.pt").exists()
    assert not (root / "step_1").exists()
    assert (root / "step_3").is_dir()  # not a checkpoint: neither kept in the count nor deleted
    # the run goes on, re-saves step 3 (overwriting the leftover) and commits it: now step_2 goes
    commit(root, _saved(root, 3), {"step": 3}, keep_last=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3"]
    assert (root / "latest").read_text() == "step_3"


def test_keep_last_counts_committed_checkpoints_only(tmp_path):
    """keep_last=2 keeps the two newest committed ones; an earlier partial directory (a kill's leftover) is removed;
    the ``_universal`` conversion of a removed checkpoint goes with it."""
    root = tmp_path / "checkpoints"
    for s in (1, 2):
        _committed(root, s)
    (root / "step_1_universal").mkdir()
    _partial(root, 3)
    commit(root, _saved(root, 4), {"step": 4}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2", "step_4"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls from outside")
def test_commit_fsyncs_before_latest_moves(tmp_path):
    """Watched from outside (strace of the process that commits): each rank's checkpoint files are fsynced
    (``sync_tree``), the state file's bytes are fsynced before its rename, ``latest``'s before its rename, and each
    directory after a rename into it — so a node crash cannot leave ``latest`` empty or naming unwritten files."""
    root = tmp_path / "checkpoints"
    _committed(root, 1)
    tag = _saved(root, 2)
    (root / tag / "rng_rank0.pt").write_bytes(b"r")
    code = ("import sys; from pathlib import Path; from fpo_dist.checkpoints import commit, sync_tree; "
            "r = Path(sys.argv[1]); sync_tree(r / 'step_2'); commit(r, 'step_2', {'step': 2}, keep_last=2)")
    trace = tmp_path / "trace.txt"
    subprocess.run(["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                    sys.executable, "-c", code, str(root)], check=True, timeout=120)
    calls = [ln for ln in trace.read_text().splitlines() if re.search(r"\b(fsync|fdatasync|rename\w*)\(", ln)]

    def first(pattern: str) -> int:
        idx = [i for i, ln in enumerate(calls) if re.search(pattern, ln)]
        assert idx, f"no call matching {pattern!r} in:\n" + "\n".join(calls)
        return idx[0]

    step = re.escape(str(root / tag))
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt"):
        assert first(rf"fsync\(\d+<{step}/{re.escape(name)}>") < first(r"rename\w*\(.*fpo_state\.json\.tmp")
    state_sync = first(rf"fsync\(\d+<{step}/fpo_state\.json\.tmp>")
    state_rename = first(r"rename\w*\(.*fpo_state\.json\.tmp")
    assert state_sync < state_rename
    assert any(re.search(rf"fsync\(\d+<{step}>\)", ln) for ln in calls[state_rename:])  # the directory entry
    latest_sync = first(rf"fsync\(\d+<{re.escape(str(root))}/latest\.tmp>")
    latest_rename = first(r"rename\w*\(.*latest\.tmp")
    assert state_rename < latest_sync < latest_rename
    assert any(re.search(rf"fsync\(\d+<{re.escape(str(root))}>\)", ln) for ln in calls[latest_rename:])
    assert (root / "latest").read_text() == "step_2"
