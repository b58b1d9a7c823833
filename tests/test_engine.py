"""DeepSpeed config building (pure), worker planning and provenance-derived model configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo_dist.config import CacheConfig, ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def template(name="zero3.json"):
    return json.loads((ROOT / "ds_configs" / name).read_text())


def train_cfg(*args):
    return load_config(TrainConfig, None, ["--cache", "/s", *args])


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_templates_fill_every_auto(name):
    from fpo_dist.engine import build_ds_config

    ds = build_ds_config(template(name), train_cfg("--micro_batch_size", "2", "--grad_accum", "4"), 8, 2304, True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True}
    assert "auto" not in json.dumps(ds)


def test_global_batch_arithmetic_is_checked():
    from fpo_dist.engine import build_ds_config

    with pytest.raises(ConfigError, match=r"global_batch_size 32 != micro_batch_size 2 × grad_accum 1 × .* 8 = 16"):
        build_ds_config(template(), train_cfg("--micro_batch_size", "2", "--global_batch_size", "32"), 8, 64, True)
    fixed = {**template(), "train_batch_size": 99}
    with pytest.raises(ConfigError, match="train_batch_size=99"):
        build_ds_config(fixed, train_cfg(), 2, 64, False)


def test_bf16_and_clipping_always_follow_the_run():
    from fpo_dist.engine import build_ds_config

    bare = build_ds_config({"zero_optimization": {"stage": 0}}, train_cfg(), 1, 64, True)
    assert bare["bf16"] == {"enabled": True}  # bf16 weights always get DeepSpeed's bf16 mode (fp32 masters)
    with pytest.raises(ConfigError, match="enabled=False"):
        build_ds_config({**template(), "bf16": {"enabled": False}}, train_cfg(), 1, 64, True)
    with pytest.raises(ConfigError, match="gradient_clipping=0.5"):
        build_ds_config({**template(), "gradient_clipping": 0.5}, train_cfg(), 1, 64, False)
    with pytest.raises(ConfigError, match="'optimizer'/'scheduler'"):
        build_ds_config({**template(), "optimizer": {"type": "Adam"}}, train_cfg(), 1, 64, False)


def test_plan_workers_refuses_what_the_cluster_cannot_schedule():
    from fpo_dist.cache.driver import CacheJobError, plan_workers

    cfg = load_config(CacheConfig, None, ["--model.name_or_path", "m", "--sae.source", "s", "--sae.layer", "1",
                                          "--data.source", "d.jsonl", "--output", "o", "--workers", "8"])
    with pytest.raises(CacheJobError, match=r"workers=8 does not fit the Ray cluster \(4 GPU"):
        plan_workers(cfg, {"GPU": 4, "CPU": 64}, n_pending=100)
    cfg.workers = 0
    assert plan_workers(cfg, {"GPU": 4, "CPU": 64}, 100) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert plan_workers(cfg, {"GPU": 4, "CPU": 64}, 3)[0] == 3  # never more actors than shards
    assert plan_workers(cfg, {"CPU": 6}, 100) == (6, {"num_cpus": 1})
    cfg.cpus_per_worker = 4
    assert plan_workers(cfg, {"CPU": 6}, 100) == (1, {"num_cpus": 4})


def test_trust_remote_code_never_comes_from_the_store():
    from fpo_dist.config import ModelConfig
    from fpo_dist.trainer import resolve_models

    prov = {"model": {"name_or_path": "org/model", "revision": None, "dtype": "float32", "gguf_file": None,
                      "tokenizer": None, "trust_remote_code": True, "files": None}}
    assert ModelConfig.from_provenance(prov).trust_remote_code is False
    policy, ref = resolve_models(train_cfg("--loss.name", "tdpo2"), prov)
    assert policy.trust_remote_code is False and ref.trust_remote_code is False
    policy, _ = resolve_models(train_cfg("--policy.trust_remote_code", "true"), prov)
    assert policy.name_or_path == "org/model"  # an empty policy section still means the cache's model


def test_zero_on_one_rank_is_flagged_unless_it_offloads():
    """ZeRO-3 (or 2) on a world of one rank gets the warning naming the way out; several ranks, stage 0 (no
    --deepspeed) and an offloading config do not."""
    from fpo_dist.engine import build_ds_config, single_rank_zero_note

    def ds(name, world):
        return build_ds_config(template(name), train_cfg(), world, 64, False)

    note = single_rank_zero_note(ds("zero3.json", 1), 1)
    assert note and "ZeRO stage 3 on a world of one rank" in note and "leave out --deepspeed" in note
    assert "ZeRO stage 2" in single_rank_zero_note(ds("zero2.json", 1), 1)
    assert single_rank_zero_note(ds("zero3.json", 2), 2) is None
    assert single_rank_zero_note(ds("zero3_offload.json", 1), 1) is None
    assert single_rank_zero_note({"zero_optimization": {"stage": 0}}, 1) is None
