"""DeepSpeed config building (pure), worker planning and provenance-derived model configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpo_dist.config import CacheConfig, ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FP32_EPS = 2.0**-23


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


_STAGE0_ONE_RANK = r"""
import copy, json, sys
import torch
from fpo_dist import engine as eng
from fpo_dist.config import TrainConfig, load_config

eng.init_distributed(60)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64))
plain = copy.deepcopy(model)
cfg = load_config(TrainConfig, None, ["--cache", "/s"])  # grad_clip 1.0
ds = eng.build_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1, 32, False)
kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
engine = eng.Engine(model, ds, optimizer=torch.optim.AdamW(model.parameters(), **kw))
flattened = []
reduce = engine.engine.buffered_allreduce_fallback
engine.engine.buffered_allreduce_fallback = lambda *a, **k: (flattened.append(1), reduce(*a, **k))[1]
opt = torch.optim.AdamW(plain.parameters(), **kw)
x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
for _ in range(3):
    loss = (engine(x) ** 2).mean() * 100.0  # gradient norm far above 1: clipping engages
    engine.backward(loss)
    engine.step()
    plain_loss = (plain(x) ** 2).mean() * 100.0
    plain_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
scale = max(p.abs().max().item() for p in plain.parameters())
print(json.dumps({"flattened": len(flattened), "diff": diff, "scale": scale, "norm": float(norm),
                  "engine_norm": engine.grad_norm(),
                  "grads_left": sum(p.grad is not None for p in model.parameters())}))
"""


def test_one_rank_without_zero_steps_like_plain_torch_and_flattens_no_gradient():
    """At world size 1 without ZeRO (the README's one-GPU command) DeepSpeed's engine trains exactly what plain
    torch does — backward, ``clip_grad_norm_`` to 1, fused AdamW — and skips its gradient "all-reduce" over the one
    rank, which would flatten every gradient into a second fp32 copy (+0.5 GB peak RSS on Gemma 3 270M)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", _STAGE0_ONE_RANK], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["norm"] > 10.0  # the clip engaged (the comparison covers DeepSpeed's clip, not just Adam)
    assert r["flattened"] == 0 and r["grads_left"] == 0
    assert abs(r["engine_norm"] - r["norm"]) <= 1e-5 * r["norm"]  # the run logs DeepSpeed's clip norm
    # 3 Adam steps of lr 1e-2 from the same start: the two sides differ only in the rounding of the clip's norm
    # (DeepSpeed sums per-tensor norms' squares, torch takes the norm of the norms): a few fp32 ulps of the weights
    assert r["diff"] <= 16 * FP32_EPS * r["scale"], r


_ALLREDUCE_BF16 = r"""
import sys
import torch
from fpo_dist import engine as eng
from fpo_dist.config import TrainConfig, load_config

eng.init_distributed(60)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64)).to(torch.bfloat16)
cfg = load_config(TrainConfig, None, ["--cache", "/s"])
ds = eng.build_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1, 32, True)
engine = eng.Engine(model, ds, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
assert engine.engine.enable_backward_allreduce is False
engine.engine.enable_backward_allreduce = sys.argv[1] == "replaced"
x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
for _ in range(3):
    engine.backward((engine(x).float() ** 2).mean() * 100.0)
    engine.step()
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, sys.argv[2])
"""


def test_one_rank_bf16_without_the_gradient_all_reduce_equals_with_it(tmp_path):
    """bf16 without ZeRO on one rank (DeepSpeed's bf16 optimizer wrapper, fp32 master weights): three steps without
    the one-rank gradient "all-reduce" leave every weight bit-identical to the path it replaces."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    for mode in ("new", "replaced"):
        out = subprocess.run([sys.executable, "-c", _ALLREDUCE_BF16, mode, str(tmp_path / f"{mode}.pt")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    import torch

    new, old = (torch.load(tmp_path / f"{m}.pt", weights_only=True) for m in ("new", "replaced"))
    assert new.keys() == old.keys()
    for name in new:
        assert new[name].dtype == torch.bfloat16 and torch.equal(new[name], old[name]), name


_UNIVERSAL_ROUND_TRIP = r"""
import json, sys
from pathlib import Path
import torch
from fpo_dist import engine as eng
from fpo_dist.config import TrainConfig, load_config

eng.init_distributed(60)
bf16, out = sys.argv[1] == "bf16", Path(sys.argv[2])


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48), torch.nn.Linear(48, 64))
    model[1].requires_grad_(False)  # a frozen parameter between trainable ones: not in the optimizer
    model = model.to(torch.bfloat16 if bf16 else torch.float32)
    cfg = load_config(TrainConfig, None, ["--cache", "/s"])
    ds = eng.build_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1, 32, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, eng.Engine(model, ds, optimizer=torch.optim.AdamW(params, lr=1e-2, fused=True))


def step(engine, seed):
    x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(seed))
    engine.backward((engine(x).float() ** 2).mean() * 100.0)
    engine.step()


def masters(engine):  # what the optimizer steps: the fp32 weights (bf16: the wrapper's fp32 master copies)
    inner = engine.optimizer.optimizer if bf16 else engine.optimizer
    assert bf16 == hasattr(engine.optimizer, "fp32_groups")
    params = [p for g in inner.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in params)
    return [(p.detach().clone(), {k: v.clone() for k, v in inner.state[p].items()}) for p in params]


model, engine = build()
assert eng.engine_layout(engine.ds_config) == (eng.PLAIN_BF16 if bf16 else eng.PLAIN)
for seed in (1, 2):
    step(engine, seed)
engine.save(str(out), "step_2", {"client": 7})
trainable = [n for n, p in model.named_parameters() if p.requires_grad]
eng._plain_to_universal(out / "step_2", out / "step_2_universal", trainable)
fresh_model, fresh = build()
client = fresh.load(str(out), "step_2_universal")
report = {"client": client.get("client"), "steps": fresh.engine.global_steps, "mismatch": []}
for (a, sa), (b, sb) in zip(masters(engine), masters(fresh)):
    if not torch.equal(a, b):
        report["mismatch"].append("master")
    for k in sa:
        if not torch.equal(sa[k].float().cpu(), sb[k].float().cpu()):
            report["mismatch"].append(k)
for seed in (3, 4):  # both go on: the same Adam steps from the same state
    step(engine, seed)
    step(fresh, seed)
for (n, p), q in zip(model.named_parameters(), fresh_model.parameters()):
    if not torch.equal(p, q):
        report["mismatch"].append(f"{n} after 2 more steps")
report["dtypes"] = sorted({str(p.dtype) for p in fresh_model.parameters()})
print(json.dumps(report))
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_no_zero_checkpoint_through_the_universal_format_resumes_exactly(tmp_path, dtype):
    """A no-ZeRO checkpoint (fp32: the torch optimizer's state; bf16: DeepSpeed's bf16 wrapper's fp32 masters)
    written in DeepSpeed's universal format and loaded into a fresh no-ZeRO engine: every master weight and optimizer
    state bit-identical to the saved engine's, and two more steps on both leave every weight bit-identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", _UNIVERSAL_ROUND_TRIP, dtype, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mismatch"] == [] and r["client"] == 7 and r["steps"] == 2, r
    assert r["dtypes"] == (["torch.bfloat16"] if dtype == "bf16" else ["torch.float32"])
    assert sorted(p.name for p in (tmp_path / "step_2_universal" / "zero").iterdir()) == ["0.weight", "2.bias",
                                                                                          "2.weight",
                                                                                          "optimizer_state.pt"]


def test_resume_conversion_decides_by_layout_world_and_stage(tmp_path):
    """What resumes as it is, what goes through DeepSpeed's universal format, and what is refused in one line; the
    layout of a checkpoint saved before layouts were recorded, from its files."""
    from fpo_dist.engine import PARTITIONED, PLAIN, PLAIN_BF16, checkpoint_layout, resume_conversion

    assert checkpoint_layout(tmp_path, PLAIN_BF16, PARTITIONED) == PLAIN_BF16  # recorded
    assert checkpoint_layout(tmp_path, None, PLAIN_BF16) == PLAIN_BF16  # no ZeRO files: fp32 or bf16, as this run
    assert checkpoint_layout(tmp_path, None, PARTITIONED) == PLAIN
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint_layout(tmp_path, None, PLAIN) == PARTITIONED

    assert resume_conversion(PLAIN, 1, 0, PLAIN, 8, 0, True) is False  # whole state: any world
    assert resume_conversion(PLAIN_BF16, 1, 0, PLAIN_BF16, 4, 0, False) is False
    assert resume_conversion(PARTITIONED, 2, 3, PARTITIONED, 2, 3, True) is False
    assert resume_conversion(PARTITIONED, 2, None, PARTITIONED, 2, 3, False) is False  # stage not recorded: as before
    assert resume_conversion(PARTITIONED, 2, 3, PARTITIONED, 4, 3, True) is True  # another world
    assert resume_conversion(PARTITIONED, 2, 3, PARTITIONED, 2, 2, True) is True  # another stage
    assert resume_conversion(PLAIN, 1, 0, PARTITIONED, 2, 3, True) is True
    assert resume_conversion(PARTITIONED, 2, 3, PLAIN, 1, 0, True) is True
    with pytest.raises(ConfigError, match="did not record its optimizer's parameters: resume it without --deepspeed"):
        resume_conversion(PLAIN, 1, 0, PARTITIONED, 2, 3, False)
    for saved, now in ((PLAIN_BF16, PARTITIONED), (PARTITIONED, PLAIN_BF16), (PLAIN, PLAIN_BF16), (PLAIN_BF16, PLAIN)):
        assert resume_conversion(saved, 1, 0, now, 2, 3 if now == PARTITIONED else 0, True) is True, (saved, now)
    with pytest.raises(ConfigError, match="did not record its optimizer's parameters"):
        resume_conversion(PLAIN_BF16, 1, 0, PARTITIONED, 2, 3, False)
