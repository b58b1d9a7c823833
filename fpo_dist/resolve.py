"""Resolve before work: find the model, tokenizer and SAE on local disk, once, and check what can be checked
without a forward — before any Ray worker or training rank loads them.

Contract:

* a **local directory** is used as is; a path that does not exist is refused (never read as a hub id);
* a **hub id** is looked up in the Hugging Face cache (``HF_HOME``); when the hub is reachable and
  ``HF_HUB_OFFLINE`` is not set, the needed files are downloaded into that cache first (``snapshot_download``);
* a **sae-lens release + id** is checked against sae-lens's own registry (``pretrained_saes.yaml``, read without
  importing sae-lens), then loaded once with ``SAE.from_pretrained`` and saved with ``save_model`` under
  ``$HF_HOME/fpo-dist/saes/<release>/<sae_id>``; later runs (and every worker) load that directory.  Offline, only
  that directory is used: sae-lens's Gemma Scope 2 loader fetches tensor shapes with plain ``requests`` even when
  ``HF_HUB_OFFLINE=1``, so it is never called offline;
* checks: the layer is in range, the SAE's ``d_in`` equals the model's hidden size, and the SAE's own hook metadata
  (``hook_name``, e.g. ``blocks.12.hook_resid_post``) names the configured layer's residual output.

Every failure is a :class:`ResolveError`: one line naming the thing and what to do.  The callers (the cache driver and
the trainer) print it and exit 2, before any worker or rank has loaded anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "*.jinja"]
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post)$")


class ResolveError(ValueError):
    """A model, tokenizer or SAE that cannot be found or does not fit: one line, naming it and what to do."""


# --------------------------------------------------------------------------------------------- hub helpers


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_home() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def _is_path_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def _todo_offline(what: str, name: str) -> str:
    return (f"{what} {name!r} is not in the local Hugging Face cache ({_hf_home()}) and the hub is not used "
            f"(HF_HUB_OFFLINE=1): download it on a machine with hub access (`huggingface-cli download {name} "
            f"--local-dir DIR`) and pass that directory instead")


def resolve_dir(name: str, revision: str | None, what: str, key: str, gguf_file: str | None = None) -> str:
    """A local directory holding ``name``'s files (``what`` / ``key`` name it in errors)."""
    if not name:
        raise ResolveError(f"'{key}' is empty: give a local directory or a hub id")
    local = os.path.expanduser(name)
    if _is_path_like(name):
        if not os.path.isdir(local):
            raise ResolveError(f"'{key}': {what} directory {name!r} does not exist: check the path")
        if gguf_file and not os.path.isfile(os.path.join(local, gguf_file)):
            raise ResolveError(f"'{key}': GGUF file {gguf_file!r} not found in {name!r}")
        return local
    from huggingface_hub import snapshot_download

    patterns = _MODEL_FILES + ([gguf_file] if gguf_file else [])
    try:
        return snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=hub_offline())
    except Exception as e:  # noqa: BLE001 — hub errors come in many types; each gets one line
        if hub_offline():
            raise ResolveError(f"'{key}': " + _todo_offline(what, name)) from None
        kind = type(e).__name__
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise ResolveError(f"'{key}': {what} {name!r} (revision {revision or 'main'}) does not exist on the "
                               "Hugging Face Hub (or needs a token: `huggingface-cli login`); check the id") from None
        raise ResolveError(f"'{key}': could not download {what} {name!r} ({kind}: {' '.join(str(e).split())[:160]}); "
                           "if this machine cannot reach the hub, download it elsewhere and pass the directory, "
                           "or set HF_HUB_OFFLINE=1 with a pre-filled HF cache") from None


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    path: str  # local directory
    n_layers: int
    hidden_size: int
    vocab_size: int | None = None


def resolve_model(name_or_path: str, revision: str | None = None, gguf_file: str | None = None,
                  trust_remote_code: bool = False, key: str = "model.name_or_path") -> ModelInfo:
    """The model's local directory, number of decoder blocks and hidden size (from its config alone)."""
    path = resolve_dir(name_or_path, revision, "model", key, gguf_file)
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ResolveError(f"'{key}': {path} holds no readable model config ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}); point it at a Hugging Face model directory") from None
    text = getattr(config, "text_config", None) or config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    if not n_layers or not hidden:
        raise ResolveError(f"'{key}': the config in {path} names no num_hidden_layers / hidden_size")
    vocab = getattr(text, "vocab_size", None)
    return ModelInfo(path, int(n_layers), int(hidden), int(vocab) if vocab else None)


# --------------------------------------------------------------------------------------------- SAEs


@dataclass(frozen=True)
class SAEInfo:
    path: str  # a local directory written by sae-lens ``save_model`` (load with ``load_sae(path)``)
    d_in: int
    d_sae: int
    hook_name: str | None  # the SAE's own metadata, e.g. blocks.12.hook_resid_post


def _read_sae_dir(path: Path, key: str) -> SAEInfo:
    cfg_file = path / "cfg.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except FileNotFoundError:
        raise ResolveError(f"'{key}': {path} is not a sae-lens SAE directory (no cfg.json); give a directory written "
                           "by SAE.save_model, or a sae-lens release with sae.sae_id") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ResolveError(f"'{key}': {cfg_file} is not a valid sae-lens config ({type(e).__name__}: {e})") from None
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    return SAEInfo(str(path), d_in, d_sae, hook)


def _sae_registry_text() -> str:
    """sae-lens's release registry (``pretrained_saes.yaml``), found without importing sae-lens (~10 s)."""
    import importlib.util

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ResolveError("sae-lens is not installed: `pip install sae-lens` (pinned in pyproject.toml)")
    return (Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml").read_text()


def _sae_release(release: str) -> tuple[dict | None, list[str]]:
    """``(the registry entry of release, every release name)``.  Only that release's block is parsed: the whole
    registry is ~13k lines of YAML (seconds to parse)."""
    import yaml

    text = _sae_registry_text()
    names = re.findall(r"^([^\s#][^:\n]*):\s*$", text, flags=re.M)
    if release not in names:
        return None, names
    start = text.index(f"\n{release}:\n") + 1 if not text.startswith(f"{release}:\n") else 0
    nxt = re.search(r"^[^\s#][^:\n]*:\s*$", text[start + len(release) + 2 :], flags=re.M)
    block = text[start : start + len(release) + 2 + (nxt.start() if nxt else len(text))]
    return yaml.safe_load(block)[release], names


def sae_cache_dir(release: str, sae_id: str) -> Path:
    """Where a release SAE resolved once is kept for every later run and worker."""
    return _hf_home() / "fpo-dist" / "saes" / release / sae_id.replace("/", "__")


def resolve_sae(source: str, sae_id: str | None, key: str = "sae.source") -> SAEInfo:
    """A local directory for the SAE (``source`` [/ ``sae_id``], or a release resolved once), with its d_in and hook."""
    if not source:
        raise ResolveError(f"'{key}' is empty: give a local sae-lens directory or a sae-lens release")
    local = Path(os.path.expanduser(source))
    if local.is_dir():
        if sae_id is not None:
            local = local / sae_id
            if not local.is_dir():
                raise ResolveError(f"'sae.sae_id': {sae_id!r} is not a sub-directory of the local SAE directory "
                                   f"{source!r}")
        return _read_sae_dir(local, key)
    if _is_path_like(source):
        raise ResolveError(f"'{key}': SAE directory {source!r} does not exist: check the path")
    entry, releases = _sae_release(source)
    if entry is None:
        near = sorted(r for r in releases if source.split("-")[0] in r)[:5]
        raise ResolveError(f"'{key}': {source!r} is neither a local directory nor a sae-lens release"
                           + (f" (similar releases: {', '.join(near)})" if near else ""))
    ids = [s["id"] for s in entry.get("saes", [])]
    if sae_id is None or sae_id not in ids:
        near = [i for i in ids if sae_id and sae_id.split("_")[0] in i][:5] or ids[:5]
        raise ResolveError(f"'sae.sae_id': {sae_id!r} is not an SAE of release {source!r} (e.g. {', '.join(near)})")
    cached = sae_cache_dir(source, sae_id)
    if (cached / "cfg.json").exists():
        return _read_sae_dir(cached, key)
    repo = entry.get("repo_id", "?")
    if hub_offline():
        raise ResolveError(
            f"'{key}': SAE {source} / {sae_id} (hub repo {repo}) has not been resolved on this machine and the hub "
            f"is not used (HF_HUB_OFFLINE=1): on a machine with hub access run `python -c \"from sae_lens import SAE; "
            f"SAE.from_pretrained('{source}', '{sae_id}').save_model('DIR')\"` and pass DIR as sae.source "
            f"(or run the cache job there once: it keeps the SAE in {cached})")
    return _download_sae(source, sae_id, repo, cached, key)


def _download_sae(release: str, sae_id: str, repo: str, target: Path, key: str) -> SAEInfo:
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # noqa: BLE001
        raise ResolveError(f"'{key}': could not download SAE {release} / {sae_id} from hub repo {repo} "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); download it on a machine with "
                           "access (SAE.from_pretrained(...).save_model(DIR)) and pass DIR as sae.source") from None
    if isinstance(sae, tuple):
        sae = sae[0]
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    sae.save_model(str(tmp))
    if (target / "cfg.json").exists():  # another job won the race: same content
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return _read_sae_dir(target, key)


# --------------------------------------------------------------------------------------------- checks


def check_fit(layer: int, model: ModelInfo, sae: SAEInfo | None, model_key: str = "model.name_or_path") -> None:
    """The layer is a block of the model; the SAE reads vectors of the model's width, at that layer's residual."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.n_layers:
        raise ResolveError(f"'sae.layer' {layer!r} is out of range: {model.path} has {model.n_layers} decoder blocks "
                           f"(0..{model.n_layers - 1})")
    if sae is None:
        return
    if sae.d_in != model.hidden_size:
        raise ResolveError(f"the SAE {sae.path} has d_in {sae.d_in} but the model '{model_key}' ({model.path}) has "
                           f"hidden size {model.hidden_size}: use the SAE trained on this model")
    want = f"blocks.{layer}.hook_resid_post"
    if sae.hook_name is not None and sae.hook_name != want:
        m = _HOOK.match(sae.hook_name)
        why = (f"layer {m.group(1)}, not sae.layer {layer}" if m else
               "a hook point other than a block's residual output (fpo-dist hooks blocks.L.hook_resid_post)")
        raise ResolveError(f"the SAE {sae.path} was trained on {sae.hook_name!r} but this run hooks {want!r} "
                           f"({why}): set sae.layer to the SAE's layer, or use the SAE for layer {layer}")


# --------------------------------------------------------------------------------------------- the cache job


def resolve_cache_config(cfg):
    """The :class:`~fpo_dist.config.CacheConfig` for the workers: every model, tokenizer and SAE a local directory,
    checked to fit.  The provenance keeps the user's names (hub ids, releases); workers never touch the hub."""
    m = cfg.model
    model = resolve_model(m.name_or_path, m.revision, m.gguf_file, m.trust_remote_code)
    tokenizer = (resolve_dir(m.tokenizer, m.revision, "tokenizer", "model.tokenizer") if m.tokenizer else None)
    sae = resolve_sae(cfg.sae.source, cfg.sae.sae_id)
    check_fit(cfg.sae.layer, model, sae)
    if cfg.ref_topm and model.vocab_size and cfg.ref_topm > model.vocab_size:
        raise ResolveError(f"'ref_topm' {cfg.ref_topm} is more than the model's vocabulary ({model.vocab_size} tokens, "
                           f"{model.path}): choose M <= {model.vocab_size}")
    return replace(cfg, model=replace(m, name_or_path=model.path, tokenizer=tokenizer),
                   sae=replace(cfg.sae, source=sae.path, sae_id=None))
