"""Typed configuration: YAML + CLI, unknown keys and bad combinations fail before any work."""

from __future__ import annotations

import pytest

from fpo_dist.config import CacheConfig, ConfigError, TrainConfig, load_config, split_config_args, to_yaml

CACHE_YAML = """
model: {name_or_path: /models/ref, dtype: bfloat16}
sae: {source: /saes/l1, layer: 1}
data:
  source: data/train.jsonl
  max_length: 256
  max_prompt_length: 128
output: /tmp/store
rows_per_shard: 64
chunk_rows: 32
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_then_cli_overrides_with_types(tmp_path):
    cfg = load_config(
        CacheConfig,
        write(tmp_path, CACHE_YAML),
        ["--data.max_length", "300", "--per_token_logps", "--model.revision=abc", "--data.columns",
         "{prompt: question}", "--ray_address", "null"],
    )
    assert cfg.model.dtype == "bfloat16" and cfg.data.max_length == 300 and cfg.per_token_logps is True
    assert cfg.model.revision == "abc" and cfg.data.columns == {"prompt": "question"} and cfg.ray_address is None
    assert cfg.rows_per_shard == 64 and cfg.sae.layer == 1
    text = to_yaml(cfg)  # printed in full at the start of every run
    assert "max_length: 300" in text and "rows_per_shard: 64" in text and "on_bad_row: fail" in text


def test_unknown_key_in_yaml_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(CacheConfig, write(tmp_path, CACHE_YAML.replace("  max_length: 256", "  max_lenght: 256")))
    msg = str(e.value)
    assert "unknown key 'data.max_lenght'" in msg and "did you mean 'max_length'" in msg and "c.yaml" in msg


def test_unknown_key_on_cli(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'loss.bta'.*did you mean 'beta'"):
        load_config(TrainConfig, None, ["--cache", "/s", "--loss.bta", "0.2"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'"):
        load_config(TrainConfig, None, ["--cache", "/s", "--optimizer.lr", "1"])


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.max_length' must be an integer, got 'ten'"):
        load_config(CacheConfig, write(tmp_path, CACHE_YAML), ["--data.max_length", "ten"])
    with pytest.raises(ConfigError, match=r"'loss.name' must be one of .*'fpo'.*got 'ppo'"):
        load_config(TrainConfig, None, ["--cache", "/s", "--loss.name", "ppo"])
    with pytest.raises(ConfigError, match=r"'loss.topk_mode' must be one of"):
        load_config(TrainConfig, None, ["--cache", "/s", "--loss.topk_mode", "reference"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.max_prompt_length", "256"], r"'data.max_prompt_length' \(256\) must be smaller than 'data.max_length'"),
        (["--rows_per_shard", "50"], r"'rows_per_shard' \(50\) must be a positive multiple of 'chunk_rows' \(32\)"),
        (["--sae.layer", "null"], r"'sae.layer' is required"),
        (["--data.columns", "{answer: x}"], r"'data.columns' maps unknown fields \['answer'\]"),
    ],
)
def test_invalid_cache_combinations(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CacheConfig, write(tmp_path, CACHE_YAML), overrides)


def test_invalid_train_combinations():
    with pytest.raises(ConfigError, match=r"'sae.source' is set but loss 'dpo' uses no SAE"):
        load_config(TrainConfig, None, ["--cache", "/s", "--loss.name", "dpo", "--sae.source", "/x"])
    with pytest.raises(ConfigError, match=r"'ref_model' is set but loss 'fpo'"):
        load_config(TrainConfig, None, ["--cache", "/s", "--ref_model.name_or_path", "/m"])
    with pytest.raises(ConfigError, match=r"'cache' is required"):
        load_config(TrainConfig, None, [])
    cfg = load_config(TrainConfig, None, ["--cache", "/s", "--loss.name", "tdpo2", "--ref_model.name_or_path", "/m"])
    assert cfg.loss.name == "tdpo2" and cfg.optim.betas == (0.9, 0.999)


def test_split_config_args():
    assert split_config_args(["--config", "a.yaml", "--x", "1"]) == ("a.yaml", ["--x", "1"])
    assert split_config_args(["--config=b.yaml"]) == ("b.yaml", [])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(CacheConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(CacheConfig, write(tmp_path, "a: [1,\n", "bad.yaml"))


def test_example_configs_load():
    """The documented example configs use only real keys and valid combinations."""
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    cache = load_config(CacheConfig, examples / "gemma2-2b-cache.yaml")
    assert cache.sae.layer == 25 and cache.data.schema == "messages"
    train = load_config(TrainConfig, examples / "gemma2-2b-fpo.yaml")
    assert train.loss.name == "fpo" and train.global_batch_size == 32 and train.optim.lr == 5e-7


def test_storage_options_json_or_yaml_mapping_and_masked(tmp_path):
    """``storage_options`` (a ``dict[str, Any]`` field): JSON on the CLI, a mapping in YAML, values of any type,
    nested; the printed config masks credential-like names at any depth and keeps everything else."""
    import json

    import yaml

    from fpo_dist.config import public_dict

    opts = {"endpoint_url": "http://127.0.0.1:9000", "key": "AK1", "secret": "SK1", "anon": False,
            "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "TK1"}, "default_block_size": 5}
    cli = load_config(CacheConfig, write(tmp_path, CACHE_YAML.replace("/tmp/store", "s3://b/store")),
                      ["--storage_options", f"@{write(tmp_path, json.dumps(opts), 'creds.json')}"])  # secrets: a file
    assert cli.storage_options == opts  # types kept: bool, int, nested mapping
    from_yaml = load_config(CacheConfig, write(tmp_path, CACHE_YAML.replace("/tmp/store", "s3://b/store")
                                               + "storage_options:\n  endpoint_url: http://127.0.0.1:9000\n  anon: true\n"))
    assert from_yaml.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True}
    printed = yaml.safe_load(to_yaml(cli))["storage_options"]
    assert printed == {**opts, "key": "***", "secret": "***",
                       "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "***"}}
    assert "SK1" not in to_yaml(cli) and public_dict(cli)["storage_options"]["secret"] == "***"
    assert cli.storage_options["secret"] == "SK1"  # masking never changes the config itself
    train = load_config(TrainConfig, None, ["--cache", "/local/store", "--eval_cache", "s3://b/eval",
                                            "--storage_options", '{"anon": true}'])
    assert train.storage_options == {"anon": True}


@pytest.mark.parametrize("value, message", [
    ("[1, 2]", "'storage_options' must be a mapping with string keys"),
    ("{endpoint_url: [", "'storage_options' must be a JSON mapping"),
    ("plain", "'storage_options' must be a mapping with string keys"),
])
def test_storage_options_that_are_not_a_mapping_are_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CacheConfig, write(tmp_path, CACHE_YAML.replace("/tmp/store", "s3://b/store")),
                    ["--storage_options", value])


def test_storage_options_on_local_paths_are_refused(tmp_path):
    """Options nobody would use are not silently ignored."""
    with pytest.raises(ConfigError, match="'storage_options' is set but 'output' is a local path"):
        load_config(CacheConfig, write(tmp_path, CACHE_YAML), ["--storage_options", '{"anon": true}'])
    with pytest.raises(ConfigError, match="'cache'/'eval_cache' is a local path"):
        load_config(TrainConfig, None, ["--cache", "/local/store", "--storage_options", '{"anon": true}'])


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_fused_optimizer_equals_the_per_tensor_loop(name):
    """``optim.fused``: torch's fused kernel steps the same weights as the default per-tensor loop (the path it
    replaces), within the last bits of fp32, over a few steps with weight decay and clipping-free gradients."""
    import torch

    from fpo_dist.trainer import build_optimizer

    g = torch.Generator().manual_seed(0)
    init = torch.randn(10_007, generator=g)
    grads = [torch.randn(10_007, generator=g) for _ in range(5)]
    weights = {}
    for fused in (False, True):
        cfg = load_config(TrainConfig, None, ["--cache", "/tmp/store", "--optim.name", name, "--optim.lr", "1e-3",
                                              "--optim.weight_decay", "0.01", "--optim.fused", str(fused).lower()])
        p = torch.nn.Parameter(init.clone())
        opt = build_optimizer([p], cfg)
        assert opt.defaults.get("fused") is (True if fused else None)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        weights[fused] = p.detach()
    assert not torch.equal(weights[True], init)
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=1e-6)


def test_fused_is_the_default_where_torch_has_it():
    """``optim.fused`` unset: the fused kernel for adam/adamw (the default, as in TRL), the per-tensor loop for
    rmsprop (which has none); ``false`` keeps the per-tensor loop."""
    import torch

    from fpo_dist.trainer import build_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    for name, args, fused in (("adamw", [], True), ("adam", [], True), ("rmsprop", [], None),
                              ("adamw", ["--optim.fused", "false"], None)):
        cfg = load_config(TrainConfig, None, ["--cache", "/tmp/store", "--optim.name", name, *args])
        assert build_optimizer(p, cfg).defaults.get("fused") is fused, (name, args)


def test_fused_rmsprop_is_refused():
    with pytest.raises(ConfigError, match="optim.fused.*adam and adamw only"):
        load_config(TrainConfig, None, ["--cache", "/tmp/store", "--optim.name", "rmsprop", "--optim.fused", "true"])


@pytest.mark.parametrize("args, key, domain", [
    (["--loss.beta", "-0.1"], "loss.beta", "> 0"),
    (["--loss.beta", "0"], "loss.beta", "> 0"),
    (["--loss.alpha", "-1"], "loss.alpha", ">= 0"),
    (["--loss.name", "tdpo2", "--loss.alpha", "-1"], "loss.alpha", ">= 0"),
    (["--loss.name", "simpo", "--loss.gamma", "-0.5"], "loss.gamma", ">= 0"),
    (["--loss.k", "0"], "loss.k", ">= 1"),
    (["--loss.beta", "nan"], "loss.beta", "> 0"),
    (["--optim.lr", "0"], "optim.lr", "> 0"),
    (["--optim.lr", "-1"], "optim.lr", "> 0"),
    (["--optim.lr", "inf"], "optim.lr", "> 0"),
    (["--optim.warmup_steps", "-5"], "optim.warmup_steps", ">= 0"),
    (["--optim.weight_decay", "-0.01"], "optim.weight_decay", ">= 0"),
    (["--optim.betas", "0.9,1.0"], "optim.betas[1]", "in [0, 1)"),
    (["--optim.eps", "0"], "optim.eps", "> 0"),
    (["--optim.grad_clip", "-1"], "optim.grad_clip", ">= 0"),
    (["--step0_atol_logp", "0"], "step0_atol_logp", "> 0"),
])
def test_every_hyper_parameter_has_its_domain_checked(args, key, domain):
    """Nonsense values stop the config with one line naming the key, the value and the domain (a negative β or α
    would otherwise train the inverted objective silently)."""
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["--cache", "/tmp/c", *args])
    msg = str(e.value)
    assert "\n" not in msg and f"'{key}'" in msg and domain in msg, msg


def test_in_domain_edges_are_accepted():
    cfg = load_config(TrainConfig, None, ["--cache", "/tmp/c", "--loss.alpha", "0", "--optim.warmup_steps", "0",
                                          "--optim.grad_clip", "0", "--loss.k", "1"])
    assert cfg.loss.params["alpha"] == 0 and cfg.loss.params["k"] == 1 and cfg.optim.warmup_steps == 0


def test_a_registered_loss_declares_a_domain_for_every_numeric_hyper_parameter():
    from fpo_dist.domains import ANY, POSITIVE
    from fpo_dist.losses import LOSSES, LossSpec, dpo_loss

    for spec in LOSSES.values():  # the built-in ones: every int/float key has a domain holding its default
        for key, default in spec.hyper_parameters.items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert default in spec.domains[key], (spec.name, key)
    with pytest.raises(ValueError, match="'tau' declares no domain"):
        LossSpec("x", dpo_loss, "cache", defaults={"beta": 0.1, "tau": 1.0}, domains={"beta": POSITIVE})
    with pytest.raises(ValueError, match="outside its domain"):
        LossSpec("x", dpo_loss, "cache", defaults={"beta": -0.1}, domains={"beta": POSITIVE})
    LossSpec("x", dpo_loss, "cache", defaults={"beta": 0.1, "tau": -1.0}, domains={"beta": POSITIVE, "tau": ANY})


def test_the_trainer_cli_refuses_a_negative_alpha_before_any_work(tmp_path):
    """From outside: the launcher's process exits 2 with one line, before it reads the cache or starts anything."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "launchers" / "train.py"), "--cache", str(tmp_path / "nowhere"),
                        "--loss.alpha", "-1", "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "configuration error: 'loss.alpha' is -1.0, outside its domain: it must be >= 0 (loss 'fpo')"]
    assert not (tmp_path / "out").exists()
