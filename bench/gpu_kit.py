"""The GPU kit (issue 22): the project's dependencies that the lent GPU machine's image lacks, packed to travel.

The lent machine (one H100/H200, ~15 minutes, no network) has Python 3.12 with torch, transformers, numpy, pandas,
pyarrow, scipy, ... but no DeepSpeed, Ray, Zarr, sae-lens or datasets, and at most 64 MiB of files travel with the
working tree.  So the kit is one archive, built here:

    python -m bench.gpu_kit build            # → .gpu-kit/site.tar.xz + manifest.json (make gpu-kit)
    python -m bench.gpu_kit check            # there, after bench/kit_env.sh unpacked it: imports + requirements

``build`` walks the installed metadata of the runtime dependencies (``ROOTS``, pinned in pyproject.toml) to their
whole requirement closure, drops what the image holds (``bench/gpu_image.txt``, its package list), downloads the
rest as the installed versions' wheels for the target Python (cp312 manylinux by default; a pure-Python package
published only as an sdist — DeepSpeed — is built into a wheel here), installs them into one ``site`` tree with
``pip install --target`` for that platform, prunes what no fpo-dist run loads (``PRUNE``: Ray's Java jars and
RLlib, W&B's service binaries, ...), and packs it with xz.  It refuses a kit that would not fit: the kit plus
the files that travel with the working tree must stay under the budget (``--budget-mib``, default 60 of 64).

On the GPU machine ``bench/gpu.sh`` sources ``bench/kit_env.sh``: where ``import deepspeed, ray, zarr, sae_lens``
fails it unpacks the kit to ``$FPO_KIT_DIR`` (default /tmp/fpo-kit), puts it and the repository on PYTHONPATH and
runs ``check``: every kit package imports, and every requirement in the closure is met by what is installed
there (a version the image holds that the pins do not accept is reported, not hidden).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("gpu_image.txt")
KIT = ROOT / ".gpu-kit"
ARCHIVE = "site.tar.xz"
# the runtime dependencies of pyproject.toml the image lacks (ray without [default]: the dashboard, its metrics
# and cluster launcher are not used on one machine); torch, transformers, numpy, ... are the image's
ROOTS = ("deepspeed", "ray", "zarr", "sae-lens", "datasets")
# in the closure but never imported by an fpo-dist run (sae-lens's plotting and tutorials, nltk for its text
# utilities): left out, named in the manifest; ``check`` lists them as "left out", not as failures
LEAVE_OUT = ("plotly", "plotly-express", "nltk")
# paths inside the site tree that no fpo-dist run loads
PRUNE = (
    "ray/jars",  # the Java worker (32 MB of the wheel's 79)
    "ray/rllib", "ray/serve", "ray/llm", "ray/tune", "ray/train", "ray/data", "ray/air",
    "ray/dashboard/client/build",  # the dashboard's web client (ray.init(include_dashboard=False))
    "ray/core/src/ray/raylet/raylet.debug", "ray/core/src/ray/gcs/gcs_server.debug",
    "wandb/bin",  # wandb-core and gpu_stats: the service a W&B run talks to (sae-lens imports wandb at import)
    "bin",  # console scripts written with this machine's interpreter in their #! line
)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "platform_system": "Linux"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
IMPORTS = ("deepspeed", "ray", "zarr", "numcodecs", "sae_lens", "transformer_lens", "datasets", "fpo_dist.cache",
           "fpo_dist.trainer", "fpo_dist.sae")


def image_packages(path: Path = IMAGE) -> set[str]:
    from packaging.utils import canonicalize_name

    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(x) for x in lines if x}


def closure(roots=ROOTS, env: dict | None = None) -> dict[str, str]:
    """name → installed version of every distribution ``roots`` need here (markers evaluated for ``env``)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {**TARGET, **(env or {})}
    seen: dict[str, str] = {}
    stack = [(r, ("",)) for r in roots]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"gpu_kit: {name} is required but not installed here; run `make install` first") from e
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            stack.append((req.name, ("", *req.extras)))
    return seen


def tree_bytes(root: Path = ROOT) -> int:
    """What travels with the working tree: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def _pip(*args: str) -> None:
    """pip with this interpreter; its output is shown only when it fails (then raised as CalledProcessError)."""
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                       env={**os.environ, "DS_BUILD_OPS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if r.returncode:
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)


def _platform_args(python: str) -> list[str]:
    tag = python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
            "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def fetch_wheels(pins: dict[str, str], wheels: Path, python: str, log=print) -> None:
    """The pinned wheels for ``python``: binary where one is published, else built here from the sdist (which must
    give a pure-Python wheel)."""
    wheels.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(pins.items()):
        try:
            _pip("download", "--no-deps", "-q", "-d", str(wheels), *_platform_args(python), f"{name}=={version}")
        except subprocess.CalledProcessError:
            log(f"gpu_kit: {name}=={version} has no binary wheel for Python {python}; building it from its sdist")
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    _pip("wheel", "--no-deps", "-q", "-w", tmp, f"{name}=={version}")
                except subprocess.CalledProcessError as e:
                    raise SystemExit(f"gpu_kit: {name}=={version}: neither a wheel nor an sdist build:\n"
                                     f"{e.stderr[-2000:]}") from e
                built = list(Path(tmp).glob("*.whl"))
                if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
                    raise SystemExit(f"gpu_kit: {name}=={version}: building it gave {[b.name for b in built]}, "
                                     "not one pure-Python wheel; it cannot travel as built here")
                shutil.copy(built[0], wheels / built[0].name)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(out: Path = KIT, python: str = "3.12", budget_mib: float = 60.0, log=print) -> dict:
    image = image_packages()
    full = closure(env={"python_version": python, "python_full_version": f"{python}.0"})
    pins = {k: v for k, v in full.items() if k not in image and k not in LEAVE_OUT}
    log(f"gpu_kit: {len(full)} distributions in the closure of {', '.join(ROOTS)}; {len(full) - len(pins)} in the "
        f"image or left out; {len(pins)} to pack for cp{python.replace('.', '')}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        fetch_wheels(pins, wheels, python, log)
        _pip("install", "--no-deps", "-q", "--no-compile", "--target", str(site), *_platform_args(python),
             *sorted(str(w) for w in wheels.glob("*.whl")))
        pruned = {}
        for rel in PRUNE:
            path = site / rel
            if path.exists():
                pruned[rel] = _size(path)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for cache in site.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        archive = out / ARCHIVE
        tmp_archive = Path(tmp) / ARCHIVE
        with tarfile.open(tmp_archive, "w:xz", preset=9) as tar:
            tar.add(site, arcname="site")
        kit_bytes, tree = tmp_archive.stat().st_size, tree_bytes()
        manifest = {
            "python": f"cp{python.replace('.', '')}", "platforms": list(PLATFORMS),
            "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "roots": list(ROOTS), "packages": dict(sorted(pins.items())),
            "from_the_image": sorted(k for k in full if k in image), "left_out": sorted(k for k in full if k in LEAVE_OUT),
            "pruned_bytes": pruned, "unpacked_bytes": _size(site), "archive_bytes": kit_bytes,
            "working_tree_bytes": tree, "budget_bytes": int(budget_mib * 2**20),
            "requirements": {k: v for k, v in full.items()},
        }
        total = kit_bytes + tree
        if total > manifest["budget_bytes"]:
            raise SystemExit(f"gpu_kit: the kit ({kit_bytes / 2**20:.1f} MiB) and the working tree "
                             f"({tree / 2**20:.1f} MiB) make {total / 2**20:.1f} MiB, over the {budget_mib:g} MiB "
                             "budget (64 MiB travel with a device run)")
        shutil.move(tmp_archive, archive)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"gpu_kit: {archive} {kit_bytes / 2**20:.1f} MiB ({manifest['unpacked_bytes'] / 2**20:.0f} MiB unpacked, "
        f"{sum(pruned.values()) / 2**20:.0f} MiB pruned); with the working tree {total / 2**20:.1f} MiB of the "
        f"{budget_mib:g} MiB budget")
    return manifest


def check(manifest_path: Path = KIT / "manifest.json", log=print, imports=IMPORTS) -> int:
    """Here or on the GPU machine, with the kit on the path: every import an fpo-dist run makes, and every
    requirement of the closure against what is installed (the image's versions included)."""
    import importlib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    manifest = json.loads(manifest_path.read_text())
    failures, mismatches = [], []
    for mod in imports:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 — every failure is reported, the run stops below
            failures.append(f"import {mod}: {type(e).__name__}: {e}")
    left_out = set(manifest.get("left_out", ()))
    for name in manifest["requirements"]:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name not in left_out:
                failures.append(f"{name}: not installed (neither the image nor the kit has it)")
            continue
        if name not in manifest["packages"]:  # the image's own packages: its consistency is not the kit's
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in left_out:
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                failures.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                mismatches.append(f"{name} needs {req}, the machine has {have}")
    import torch

    versions = {m: _version(m) for m in ("torch", "transformers", "deepspeed", "ray", "zarr", "sae-lens", "numpy")}
    log("gpu_kit check: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; cuda {torch.cuda.is_available()} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'})")
    for m in mismatches:
        log(f"gpu_kit check: version mismatch (runs, but not the pinned combination): {m}")
    for f in failures:
        log(f"gpu_kit check: FAILED {f}")
    log(f"gpu_kit check: {len(imports)} imports, {len(manifest['requirements'])} distributions: "
        f"{len(failures)} failures, {len(mismatches)} version mismatches")
    return 1 if failures else 0


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def probe(log=print) -> None:
    """What the machine's torch offers for packed attention (issue 22 chooses by it): versions, the device, and the
    signatures of ``varlen_attn`` (its arguments changed between torch 2.10 and 2.13) and ``flex_attention``."""
    import inspect

    import torch

    cuda = torch.cuda.is_available()
    log(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {_version('transformers')}, device "
        f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}")
    for module, name in (("torch.nn.attention.varlen", "varlen_attn"), ("torch.nn.attention.flex_attention",
                                                                         "flex_attention")):
        try:
            fn = getattr(__import__(module, fromlist=[name]), name)
            log(f"{name}{inspect.signature(fn)}")
        except (ImportError, AttributeError) as e:
            log(f"{name}: not available ({e})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build .gpu-kit/site.tar.xz here")
    b.add_argument("--out", type=Path, default=KIT)
    b.add_argument("--python", default="3.12", help="the GPU machine's Python (3.12); 3.11 for a rehearsal here")
    b.add_argument("--budget-mib", type=float, default=60.0,
                   help="the kit + the working tree must fit in this (64 MiB travel with a device run)")
    c = sub.add_parser("check", help="imports and requirements with the kit on the path")
    c.add_argument("--manifest", type=Path, default=KIT / "manifest.json")
    sub.add_parser("probe", help="torch, transformers, the device, varlen_attn's and flex_attention's signatures")
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.out, a.python, a.budget_mib)
        return 0
    if a.cmd == "probe":
        probe()
        return 0
    return check(a.manifest)


if __name__ == "__main__":
    sys.exit(main())
