"""Experiment tracking (``fpo_dist.tracking``): every sink gets the same train and eval records; W&B in offline mode
writes them to its run directory, with the config (once, at start) and ``run_info`` (once, in the summary).

W&B 0.31 has no reader for its offline transaction log (``run-<id>.wandb``), so :func:`wandb_records` reads it: the
LevelDB log framing W&B documents for the file (32 KiB blocks of ``crc32 · length · type`` framed chunks) around
``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fpo_dist.tracking import Tracker, check_report_to, scalars

RECORDS = [
    {"step": 1, "loss": 0.69, "reward_accuracy": 0.5, "epoch": 0, "grad_norm": None},
    {"step": 2, "loss": 0.61, "reward_accuracy": 0.75, "epoch": 0, "grad_norm": 1.5},
    {"step": 2, "eval/loss": 0.66, "eval/reward_accuracy": 0.6, "eval/n_pairs": 5},
    {"step": 3, "loss": float("nan"), "reward_accuracy": 1.0, "epoch": 0, "grad_norm": 2.0},
]


def wandb_records(run_dir: Path) -> dict:
    """``{"config": {...}, "history": [row, ...], "summary": {...}}`` of the one W&B run under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    out: dict = {"config": {}, "history": [], "summary": {}}
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # FULL or LAST closes a record; FIRST/MIDDLE continue it; 0 is padding
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        buf = b""
        which = record.WhichOneof("record_type")
        items = lambda update: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}  # noqa: E731
        if which == "run":
            out["config"].update(items(record.run.config.update))
        elif which == "config":  # the config can also arrive as its own record (seen on a loaded host)
            out["config"].update(items(record.config.update))
        elif which == "history":
            out["history"].append(items(record.history.item))
        elif which == "summary":
            out["summary"].update(items(record.summary.update))
    return out


def test_report_to_is_checked():
    assert check_report_to(["tensorboard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    assert check_report_to(["none"]) == []
    with pytest.raises(ValueError, match="accepts"):
        check_report_to(["mlflow"])
    with pytest.raises(ValueError, match="either 'none' or the sinks"):
        check_report_to(["none", "wandb"])


def test_report_to_from_the_command_line():
    from fpo_dist.config import ConfigError, TrainConfig, load_config

    cfg = load_config(TrainConfig, None, ["--cache", "x", "--report_to", "wandb,tensorboard"])
    assert cfg.report_to == ["wandb", "tensorboard"]
    assert load_config(TrainConfig, None, ["--cache", "x"]).report_to == ["tensorboard"]  # today's default
    with pytest.raises(ConfigError, match="report_to"):
        load_config(TrainConfig, None, ["--cache", "x", "--report_to", "wandb,mlfow"])
    with pytest.raises(ConfigError, match="eval_cache"):
        load_config(TrainConfig, None, ["--cache", "x", "--eval_every", "10"])


def test_scalars_name_train_and_eval_keys_and_skip_what_is_not_a_number():
    assert scalars(RECORDS[1]) == {"train/loss": 0.61, "train/reward_accuracy": 0.75, "train/epoch": 0.0,
                                   "train/grad_norm": 1.5}
    assert scalars(RECORDS[2]) == {"eval/loss": 0.66, "eval/reward_accuracy": 0.6, "eval/n_pairs": 5.0}
    assert "train/loss" not in scalars(RECORDS[3]) and "train/grad_norm" not in scalars(RECORDS[0])


def test_every_sink_holds_the_same_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = {"loss": {"name": "fpo", "params": {"beta": 0.1}}, "seed": 3}
    tracker = Tracker(out, ["tensorboard", "wandb"], config)
    for record in RECORDS:
        tracker.log(record)
    tracker.summary({"world_size": 2, "eval": {"best": {"step": 2}}})
    tracker.close()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [json.dumps(r) for r in lines] == [json.dumps(r) for r in RECORDS]  # as given, NaN and None included

    expected: dict[int, dict] = {}
    for record in RECORDS:
        expected.setdefault(record["step"], {}).update(scalars(record))

    wb = wandb_records(out)
    assert {k: v for k, v in wb["config"].items() if not k.startswith("_")} == config
    history = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in wb["history"]}
    assert history == expected
    assert wb["summary"]["run_info"] == {"world_size": 2, "eval": {"best": {"step": 2}}}

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            tb.setdefault(event.step, {})[tag] = event.value
    assert tb.keys() == expected.keys()
    for step, values in expected.items():
        assert tb[step] == pytest.approx(values, rel=1e-6), step
    assert {"config", "run_info"} <= {t.split("/")[0] for t in acc.Tags()["tensors"]}


def test_report_to_none_writes_only_metrics_jsonl(tmp_path):
    tracker = Tracker(tmp_path / "run", ["none"], {})
    tracker.log(RECORDS[0])
    tracker.summary({})
    tracker.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
