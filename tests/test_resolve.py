"""Resolve before work (issue 13): model, tokenizer and SAE found and checked once, before any worker starts.

Each refusal is one line naming the thing and what to do; no Ray instance is started.  The CLI test injects a
network guard from outside the process (a ``sitecustomize`` on its path) and asserts that resolving a Gemma Scope 2
release offline makes no connection beyond loopback (sae-lens's own loader would, even with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fpo_dist.config import CacheConfig, load_config
from fpo_dist.resolve import ResolveError, check_fit, resolve_cache_config, resolve_model, resolve_sae

ROOT = Path(__file__).resolve().parents[1]
GEMMA_SCOPE_2 = ("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("resolve") / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}) + "\n")
    return str(path)


def config(tiny, data, tmp_path, **over) -> CacheConfig:
    args = {"model.name_or_path": str(tiny.model_dir), "sae.source": str(tiny.sae_dir),
            "sae.layer": str(tiny.hook_layer), "data.source": data, "output": str(tmp_path / "store"),
            "rows_per_shard": "4", "chunk_rows": "4", "device": "cpu", **over}
    return load_config(CacheConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)])


def test_local_inputs_resolve_to_themselves(tiny, data, tmp_path):
    work = resolve_cache_config(config(tiny, data, tmp_path))
    assert work.model.name_or_path == str(tiny.model_dir) and work.sae.source == str(tiny.sae_dir)
    info = resolve_model(str(tiny.model_dir))
    assert (info.n_layers, info.hidden_size) == (2, 32)
    sae = resolve_sae(str(tiny.sae_dir), None)
    assert (sae.d_in, sae.hook_name) == (32, f"blocks.{tiny.hook_layer}.hook_resid_post")


def _other_sae(tmp_path, **kw) -> str:
    from fpo_dist.testing import build_sae

    out = tmp_path / "other-sae"
    build_sae(out, **kw)
    return str(out)


@pytest.mark.parametrize("case", ["missing model", "missing sae", "layer out of range", "d_in", "hook layer",
                                  "unknown release", "unknown sae id", "gemma scope 2 offline"])
def test_cache_job_refuses_before_any_worker_starts(tiny, data, tmp_path, case, monkeypatch):
    import ray

    from fpo_dist.cache.driver import run_cache_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing resolved before
    over, expected = {
        "missing model": ({"model.name_or_path": str(tmp_path / "nowhere")}, "does not exist: check the path"),
        "missing sae": ({"sae.source": str(tmp_path / "no-sae")}, "SAE directory"),
        "layer out of range": ({"sae.layer": "5"}, "'sae.layer' 5 is out of range: "),
        "d_in": ({"sae.source": _other_sae(tmp_path, d_in=48)}, "has d_in 48 but the model"),
        "hook layer": ({"sae.layer": "0"}, "trained on 'blocks.1.hook_resid_post' but this run hooks "
                                           "'blocks.0.hook_resid_post'"),
        "unknown release": ({"sae.source": "gemma-scope-9-nonexistent", "sae.sae_id": "x"},
                            "neither a local directory nor a sae-lens release"),
        "unknown sae id": ({"sae.source": GEMMA_SCOPE_2[0], "sae.sae_id": "layer_99"},
                           "is not an SAE of release 'gemma-scope-2-270m-pt-res'"),
        "gemma scope 2 offline": ({"sae.source": GEMMA_SCOPE_2[0], "sae.sae_id": GEMMA_SCOPE_2[1]},
                                  "has not been resolved on this machine and the hub is not used"),
    }[case]
    logs = []
    with pytest.raises(ResolveError) as err:
        run_cache_job(config(tiny, data, tmp_path, **over), log=logs.append)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not ray.is_initialized()  # refused before Ray (let alone a worker) started
    assert not (tmp_path / "store").exists()  # and before the store was planned


def test_check_fit_names_both_layers():
    from fpo_dist.resolve import ModelInfo, SAEInfo

    model = ModelInfo("/m", n_layers=18, hidden_size=640)
    check_fit(12, model, SAEInfo("/s", 640, 16384, "blocks.12.hook_resid_post"))
    check_fit(12, model, SAEInfo("/s", 640, 16384, None))  # no metadata: nothing to compare
    with pytest.raises(ResolveError, match="'blocks.12.hook_resid_post'.*'blocks.11.hook_resid_post'"):
        check_fit(11, model, SAEInfo("/s", 640, 16384, "blocks.12.hook_resid_post"))
    with pytest.raises(ResolveError, match="other than a block's residual output"):
        check_fit(12, model, SAEInfo("/s", 640, 16384, "blocks.12.hook_mlp_out"))
    with pytest.raises(ResolveError, match="out of range"):
        check_fit(18, model, None)


_NET_GUARD = textwrap.dedent('''
    # Test-only: record and refuse every connection (and name lookup) that is not loopback.
    import ipaddress, os, socket

    _log = os.environ["FPO_NET_LOG"]
    _gai, _connect = socket.getaddrinfo, socket.socket.connect

    def _loopback(host):
        if host in (None, "localhost", "", b"localhost"):
            return True
        try:
            return ipaddress.ip_address(host if isinstance(host, str) else host.decode()).is_loopback
        except ValueError:
            return False

    def getaddrinfo(host, *a, **k):
        if not _loopback(host):
            open(_log, "a").write(f"getaddrinfo {host}\\n")
            raise OSError(f"test network guard: lookup of {host} refused")
        return _gai(host, *a, **k)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            open(_log, "a").write(f"connect {address}\\n")
            raise OSError(f"test network guard: connection to {address} refused")
        return _connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
''')


def test_gemma_scope_2_release_offline_cli_one_line_no_network(tiny, data, tmp_path):
    """The issue's case through the CLI: one clear line, exit 2, no traceback, no Ray, no connection beyond loopback."""
    from fpo_dist.config import to_yaml

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NET_GUARD)
    net_log = tmp_path / "net.log"
    cfg = config(tiny, data, tmp_path, **{"sae.source": GEMMA_SCOPE_2[0], "sae.sae_id": GEMMA_SCOPE_2[1],
                                           "sae.layer": "1"})
    (tmp_path / "cache.yaml").write_text(to_yaml(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "FPO_NET_LOG": str(net_log),
           "PYTHONPATH": os.pathsep.join([str(guard), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "fpo_dist.cache", "--config", str(tmp_path / "cache.yaml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: 'sae.source': SAE gemma-scope-2-270m-pt-res / "
                                               "layer_12_width_16k_l0_medium"), res.stderr
    assert "HF_HUB_OFFLINE=1" in err[0] and "save_model" in err[0]
    assert "Traceback" not in res.stdout + res.stderr and "Ray" not in res.stdout + res.stderr
    assert not net_log.exists(), net_log.read_text()

    # the guard really guards: a hub call without HF_HUB_OFFLINE is refused and recorded
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "huggingface.co" in net_log.read_text()
