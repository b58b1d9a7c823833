"""The GPU kit (bench/gpu_kit.py, bench/kit_env.sh): the closure it packs, the check it runs on the GPU machine, and
the bootstrap's refusal without a kit.  Building the kit downloads ~80 MB and takes minutes: `make gpu-kit`, and
`make gpu-kit-rehearsal` runs it in an emulated image (not in the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench import gpu_kit

ROOT = Path(__file__).resolve().parents[1]


def test_the_closure_follows_installed_requirements_with_their_versions():
    got = gpu_kit.closure(("zarr",))
    for name in ("zarr", "numcodecs", "donfig", "numpy"):  # zarr 3 → numcodecs, donfig, numpy
        assert got[name] == metadata.version(name)
    assert "torch" not in got  # nothing zarr does not need
    everything = gpu_kit.closure()
    assert {"deepspeed", "ray", "sae-lens", "datasets", "transformer-lens", "torch"} <= set(everything)


def test_the_image_list_is_read_canonically(tmp_path):
    listing = tmp_path / "image.txt"
    listing.write_text("# a comment\nPyYAML\ntyping_extensions  # trailing\n\n")
    assert gpu_kit.image_packages(listing) == {"pyyaml", "typing-extensions"}
    image = gpu_kit.image_packages()  # the committed list: what the GPU machine has and lacks
    assert {"torch", "transformers", "numpy", "pandas", "pyarrow"} <= image
    assert not {"deepspeed", "ray", "zarr", "sae-lens", "datasets"} & image


def test_check_reports_a_missing_distribution_and_passes_a_complete_one(tmp_path):
    zarr = {k: v for k, v in gpu_kit.closure(("zarr",)).items()}
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"packages": {"zarr": zarr["zarr"]}, "requirements": zarr, "left_out": []}))
    lines: list[str] = []
    assert gpu_kit.check(ok, log=lines.append, imports=("zarr",)) == 0
    assert lines[-1].endswith("0 failures, 0 version mismatches")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"packages": {"zarr": zarr["zarr"]}, "left_out": ["left-behind"],
                               "requirements": {**zarr, "no-such-distribution": "1.0", "left-behind": "2.0"}}))
    lines.clear()
    assert gpu_kit.check(bad, log=lines.append, imports=("zarr", "no_such_module_xyz")) == 1
    text = "\n".join(lines)
    assert "FAILED no-such-distribution: not installed" in text and "FAILED import no_such_module_xyz" in text
    assert "left-behind" not in text  # left out on purpose: not a failure


def test_the_working_tree_size_counts_tracked_and_unignored_files(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big").write_bytes(b"y" * 5000)
    assert gpu_kit.tree_bytes(tmp_path) == 1000 + len("ignored/\n")


def test_the_bootstrap_refuses_without_a_kit_and_changes_nothing_where_everything_imports(tmp_path):
    script = 'source bench/kit_env.sh; echo "PYTHONPATH=${PYTHONPATH:-}"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PY": "/usr/bin/python3", "FPO_KIT": str(tmp_path / "none")})
    assert bare.returncode == 2
    assert f"no kit at {tmp_path / 'none'}/site.tar.xz" in bare.stderr and "make gpu-kit" in bare.stderr
    here = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PY": sys.executable, "FPO_KIT": str(tmp_path / "none")})
    assert here.returncode == 0 and here.stdout.strip() == "PYTHONPATH="


def test_the_probe_names_the_attention_entry_points_it_finds():
    """``gpu_kit probe`` (the lent session's first step) reports torch's version and, per packed-attention entry
    point, its signature or why it is missing — never an exception."""
    import torch

    lines: list[str] = []
    gpu_kit.probe(log=lines.append)
    assert lines[0].startswith(f"torch {torch.__version__}")
    assert any(x.startswith("flex_attention(") for x in lines)
    assert any(x.startswith("varlen_attn") for x in lines)  # its signature, or "varlen_attn: not available (...)"
