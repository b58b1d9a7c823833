"""Package-level promises: a light import, pinned dependencies, no unsafe defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sae_lens", "ray", "deepspeed", "zarr", "transformers", "datasets")


def test_import_is_light():
    code = (
        "import sys, fpo_dist, fpo_dist.config, fpo_dist.losses;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing fpo_dist pulled in {out}"


def test_runtime_dependencies_are_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    for name in ("torch", "deepspeed", "transformers", "sae-lens", "datasets", "ray[default]", "zarr"):
        assert re.search(rf'"{re.escape(name)}==[0-9.]+"', deps), f"{name} is not pinned with =="


def test_no_unsafe_defaults_in_code():
    for path in (ROOT / "fpo_dist").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        assert "pickle" not in text or path.name == "__init__.py", f"{path} uses pickle"
