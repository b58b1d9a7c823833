"""Where a run's records go: ``metrics.jsonl`` always, plus the sinks named by ``report_to``.

Sinks: ``tensorboard`` (``<output_dir>/tensorboard``), ``wandb`` (the optional ``wandb`` extra; ``WANDB_MODE``,
``WANDB_PROJECT``, ``WANDB_DIR`` and the rest of W&B's environment apply; by default its files go under
``<output_dir>/wandb``), or ``none``.  Every sink receives the same records: a training record's keys are logged as
``train/<key>``, an evaluation record's keys already carry ``eval/``.  The run's config is given to each sink once at
start, and ``run_info`` once (:meth:`Tracker.summary`).  Only rank 0 builds a tracker.  The config given is the
masked one (``fpo_dist.config.public_dict``); W&B, which records the command line, sees it masked as well
(``fpo_dist.storage_options.mask_argv``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

SINKS = ("tensorboard", "wandb", "none")


def check_report_to(report_to: list[str]) -> list[str]:
    """The sinks to open (``none`` alone means none); raises ``ValueError`` naming an unknown or mixed value."""
    unknown = [s for s in report_to if s not in SINKS]
    if unknown:
        raise ValueError(f"'report_to' accepts {list(SINKS)} (several, comma-separated), got {unknown}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"'report_to' lists 'none' together with {[s for s in report_to if s != 'none']}; "
                         "give either 'none' or the sinks")
    return [s for s in dict.fromkeys(report_to) if s != "none"]


def scalars(record: dict) -> dict[str, float]:
    """The loggable scalars of a record, named as every sink logs them (``train/…`` or ``eval/…``)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[key if "/" in key else f"train/{key}"] = float(value)
    return out


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def summary(self, info: dict) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, info: dict) -> None:
        self.writer.add_text("run_info", "```\n" + json.dumps(info, indent=1, default=str) + "\n```", 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("report_to 'wandb' needs the wandb package: pip install 'fpo-dist[wandb]'") from None
        self.wandb = wandb
        directory = Path(os.environ.get("WANDB_DIR") or out)
        directory.mkdir(parents=True, exist_ok=True)
        from fpo_dist.storage_options import masked_argv

        with masked_argv():  # W&B records sys.argv in the run's metadata: never a credential given inline
            self.run = wandb.init(config=config, dir=str(directory), name=os.environ.get("WANDB_NAME") or out.name,
                                  reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, info: dict) -> None:
        self.run.summary["run_info"] = json.loads(json.dumps(info, default=str))

    def close(self) -> None:
        self.run.finish()


_SINK_CLASSES = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class Tracker:
    """Rank 0's logger: ``metrics.jsonl`` (one JSON record per line, as given) and every sink of ``report_to``."""

    def __init__(self, out_dir: str | Path, report_to: list[str], config: dict):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "a")
        self.sinks: list[Any] = []
        try:
            for name in check_report_to(report_to):
                self.sinks.append(_SINK_CLASSES[name](self.out, config))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = scalars(record)
        for sink in self.sinks:
            sink.log(values, int(record["step"]))

    def summary(self, info: dict) -> None:
        for sink in self.sinks:
            sink.summary(info)

    def close(self) -> None:
        try:
            for sink in self.sinks:
                sink.close()
        finally:
            self.sinks = []
            if not self.file.closed:
                self.file.close()
