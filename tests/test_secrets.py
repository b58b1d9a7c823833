"""Credentials: from a file or the environment, refused inline on a command line, masked inside values, never echoed
by an error.  (The whole S3 pipeline under the deepspeed launcher, grepped for the secret: tests/test_s3.py.)"""

from __future__ import annotations

import json

import pytest

from fpo_dist.config import CacheConfig, ConfigError, TrainConfig, load_config, parse_storage_options, to_yaml
from fpo_dist.storage_options import ALLOW_ENV_VAR, ENV_VAR, mask_argv, mask_secrets, mask_text

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"  # AWS's documented example secret ('/' and '+' inside)
AKID = "AKIAIOSFODNN7EXAMPLE"
CACHE_ARGS = ["--model.name_or_path", "/m", "--sae.source", "/s", "--sae.layer", "1", "--data.source", "d.jsonl",
              "--output", "s3://bucket/store"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(ALLOW_ENV_VAR, raising=False)


# Values written out by hand: what a user pastes, and what must be left of it.
@pytest.mark.parametrize("value, masked", [
    (f"https://{AKID}:{SECRET}@minio.internal:9000", "https://***@minio.internal:9000"),  # URL userinfo, '/' in it
    ("ftp://user:pa55@host/dir", "ftp://***@host/dir"),
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFy+/YmF6==;EndpointSuffix=core.windows.net",
     "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=***;EndpointSuffix=core.windows.net"),
    ("Server=db;Database=x;User Id=me;Password=hunter2;", "Server=db;Database=x;User Id=me;Password=***;"),
    ("Server=db;Pwd=hunter2", "Server=db;Pwd=***"),
    ("https://acct.blob.core.windows.net/c?sv=2022-11-02&ss=b&sig=AbC%2Bd%3D&se=2030", "https://acct.blob.core."
     "windows.net/c?sv=2022-11-02&ss=b&sig=***&se=2030"),  # Azure SAS
    (f"https://b.s3.amazonaws.com/k?X-Amz-Credential={AKID}%2F2024&X-Amz-Signature=abc123&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),  # presigned S3
    ("https://host/api?access_token=ya29.xyz&page=2", "https://host/api?access_token=***&page=2"),
    # left alone: no credential
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("hf://datasets/org/name@main/train.jsonl", "hf://datasets/org/name@main/train.jsonl"),
    ("s3://bucket/path/file@v2", "s3://bucket/path/file@v2"),
])
def test_mask_text_hides_secrets_inside_values(value, masked):
    assert mask_text(value) == masked


def test_mask_secrets_by_name_and_inside_values_at_any_depth():
    opts = {"endpoint_url": f"https://{AKID}:{SECRET}@host", "anon": False, "default_block_size": 5,
            "connection_string": f"AccountName=a;AccountKey={SECRET}", "password": "p", "sas_token": "sv=1&sig=x",
            "pwd": "p2", "token": {"type": "service_account", "private_key": "-----BEGIN"},
            "client_kwargs": {"region_name": "eu", "aws_session_token": "T"}, "config_kwargs":
            {"signature_version": "s3v4"}, "list": [f"ftp://u:{SECRET}@h"], "key": None}
    masked = mask_secrets(opts)
    assert SECRET not in json.dumps(masked) and AKID not in json.dumps(masked)
    assert masked == {"endpoint_url": "https://***@host", "anon": False, "default_block_size": 5,
                      "connection_string": "AccountName=a;AccountKey=***", "password": "***", "sas_token": "***",
                      "pwd": "***", "token": "***", "client_kwargs": {"region_name": "eu", "aws_session_token": "***"},
                      "config_kwargs": {"signature_version": "s3v4"}, "list": ["ftp://***@h"], "key": None}
    assert opts["endpoint_url"].endswith("@host") and opts["password"] == "p"  # the options themselves unchanged


@pytest.mark.parametrize("text", [
    '{"endpoint_url": "http://h", "secret": "' + SECRET + '"',  # unclosed
    '{"secret": "' + SECRET + '", key: [',
    "{secret: " + SECRET + ", : :}",
    "secret=" + SECRET,  # not a mapping
    '["' + SECRET + '"]',
])
def test_a_malformed_value_is_never_echoed(tmp_path, text):
    """The error names the option (and a position), never the text: it may hold the secret."""
    with pytest.raises(ConfigError, match="'storage_options' must be a") as e:
        load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", text])
    assert SECRET not in str(e.value)
    bad = tmp_path / "creds.json"  # the same text in a file
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"file {bad}") as e:
        load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", f"@{bad}"])
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError) as e:  # and in a config YAML: position only
        load_config(CacheConfig, _write(tmp_path / "c.yaml", "storage_options: " + text + "\n"))
    assert SECRET not in str(e.value)


def _write(path, text):
    path.write_text(text)
    return path


def test_an_inline_secret_on_the_command_line_is_refused_naming_the_key_not_the_value(capsys, monkeypatch):
    for opts, names in [({"key": AKID, "secret": SECRET}, "'storage_options.key', 'storage_options.secret'"),
                        ({"endpoint_url": f"https://{AKID}:{SECRET}@h"}, "'storage_options.endpoint_url'"),
                        ({"client_kwargs": {"aws_session_token": SECRET}},
                         "'storage_options.client_kwargs.aws_session_token'")]:
        with pytest.raises(ConfigError, match="hold\\(s\\) a credential") as e:
            load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", json.dumps(opts)])
        msg = str(e.value)
        assert names in msg and "@path.json" in msg and ENV_VAR in msg and SECRET not in msg and AKID not in msg
        with pytest.raises(ConfigError, match="hold\\(s\\) a credential"):  # verify/info too
            parse_storage_options(json.dumps(opts), {"STORE": "s3://b/s"})
    with pytest.raises(ConfigError, match="'cache' hold") as e:  # any override: a URL with userinfo
        load_config(TrainConfig, None, ["--cache", f"https://{AKID}:{SECRET}@h/store"])
    assert SECRET not in str(e.value)
    # options without a secret are fine inline
    assert load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", '{"endpoint_url": "http://h:9"}']
                       ).storage_options == {"endpoint_url": "http://h:9"}
    # the explicit opt-in: accepted, with a warning that names the key and not the value
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")
    cfg = load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", json.dumps({"secret": SECRET})])
    assert cfg.storage_options == {"secret": SECRET}
    err = capsys.readouterr().err
    assert "warning: 'storage_options.secret'" in err and SECRET not in err


def test_options_from_a_file_a_yaml_or_the_environment(tmp_path, monkeypatch):
    opts = {"endpoint_url": "http://127.0.0.1:9000", "key": AKID, "secret": SECRET}
    creds = _write(tmp_path / "creds.json", json.dumps(opts))
    cli = load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", f"@{creds}"])
    assert cli.storage_options == opts and SECRET not in to_yaml(cli)
    yaml_cfg = load_config(CacheConfig, _write(tmp_path / "c.yaml", f'storage_options: "@{creds}"\n'), CACHE_ARGS)
    assert yaml_cfg.storage_options == opts
    # the environment: JSON or a path, used only when nothing else gives options and a path is a URL
    for value in (json.dumps(opts), str(creds), f"@{creds}"):
        monkeypatch.setenv(ENV_VAR, value)
        assert load_config(CacheConfig, None, CACHE_ARGS).storage_options == opts
        train = load_config(TrainConfig, None, ["--cache", "/local", "--eval_cache", "s3://b/e"])
        assert train.storage_options == opts
        assert parse_storage_options("{}", {"STORE": "s3://b/s"}) == opts
    assert load_config(TrainConfig, None, ["--cache", "/local/store"]).storage_options == {}  # local: unused
    assert load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", '{"anon": true}']
                       ).storage_options == {"anon": True}  # the command line wins
    monkeypatch.setenv(ENV_VAR, "{not json: [" + SECRET)
    with pytest.raises(ConfigError, match=f"environment variable {ENV_VAR}") as e:
        load_config(CacheConfig, None, CACHE_ARGS)
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read the options file"):
        load_config(CacheConfig, None, [*CACHE_ARGS, "--storage_options", f"@{tmp_path / 'missing.json'}"])


def test_mask_argv_for_recorded_command_lines():
    argv = ["launchers/train.py", "--storage_options", json.dumps({"endpoint_url": "http://h", "secret": SECRET}),
            f"--storage_options={json.dumps({'key': AKID})}", "--storage-options", "@/etc/creds.json",
            "--cache", f"s3://{AKID}:{SECRET}@bucket/x", "--storage_options", "{broken " + SECRET]
    masked = mask_argv(argv)
    assert SECRET not in " ".join(masked) and AKID not in " ".join(masked)
    assert masked[:2] == argv[:2] and json.loads(masked[2]) == {"endpoint_url": "http://h", "secret": "***"}
    assert masked[4:6] == ["--storage-options", "@/etc/creds.json"] and masked[-1] == "***"


def test_wandb_records_the_command_line_masked(tmp_path, monkeypatch):
    """W&B (offline) records ``sys.argv`` in its run metadata: with a secret given inline (the opt-in), the run's
    files hold the masked command line and nowhere the secret; the argv of the process is back as it was."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    import sys

    from fpo_dist.tracking import Tracker

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["train.py", "--storage_options", json.dumps({"endpoint_url": "http://h", "secret": SECRET}),
            "--cache", f"s3://{AKID}:{SECRET}@bucket/store"]
    monkeypatch.setattr(sys, "argv", argv)
    tracker = Tracker(tmp_path / "run", ["wandb"], {"seed": 1})
    tracker.log({"step": 1, "loss": 0.5})
    tracker.close()
    assert sys.argv is argv
    files = [p for d in (tmp_path / "run", tmp_path / "wandb-home") for p in d.rglob("*") if p.is_file()]
    runs = [p for p in files if p.suffix == ".wandb"]  # offline, the metadata (argv included) is in the run's log
    assert len(runs) == 1 and b"s3://***@bucket/store" in runs[0].read_bytes()  # recorded, masked
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and AKID.encode() not in data, path
