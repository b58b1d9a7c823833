"""Every config in docs/examples/ is usable as shipped: it parses, its SAE exists in sae-lens's bundled registry
(offline), the SAE was trained on the configured model family, and the configured hook layer is the layer of that
SAE's hook (``blocks.<L>.hook_resid_post``).  Training configs point at a cache config of the same directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fpo_dist.config import CacheConfig, TrainConfig, load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "docs" / "examples").glob("*.yaml"))
CACHE_CONFIGS = [p for p in EXAMPLES if "output" in yaml.safe_load(p.read_text())]
TRAIN_CONFIGS = [p for p in EXAMPLES if p not in CACHE_CONFIGS]


def registry_hook_name(release: str, sae_id: str) -> tuple[str, str]:
    """``(model, hook name)`` of a registry SAE, offline, by sae-lens's own config code for its release family."""
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    assert release in directory, f"sae-lens has no release {release!r}"
    lookup = directory[release]
    assert sae_id in lookup.saes_map, f"{release} has no SAE {sae_id!r} (e.g. {sorted(lookup.saes_map)[:4]})"
    folder = lookup.saes_map[sae_id]
    if lookup.conversion_func == "gemma_2":  # Gemma Scope: the config is derived from the folder name, no download
        hook = loaders.get_gemma_2_config_from_hf(lookup.repo_id, folder, device=None)["hook_name"]
    elif lookup.conversion_func == "gemma_3":  # Gemma Scope 2: sae-lens infers the HF hook point offline
        hf_point = loaders._infer_gemma_3_raw_cfg_dict(lookup.repo_id, folder)["hf_hook_point_in"]
        match = re.fullmatch(r"model\.layers\.(\d+)\.output", hf_point)
        assert match, f"{release}/{sae_id}: not a residual-stream SAE ({hf_point})"
        hook = f"blocks.{match.group(1)}.hook_resid_post"  # what sae-lens names that hook point
    else:
        pytest.fail(f"{release}: teach this test to read hook names of conversion {lookup.conversion_func!r}")
    return lookup.model, hook


def _family(model: str) -> str:
    return model.split("/")[-1].removesuffix("-it")


def test_the_examples_cover_gemma2_and_gemma3():
    names = {p.name for p in EXAMPLES}
    assert {"gemma2-2b-cache.yaml", "gemma2-2b-fpo.yaml", "gemma3-1b-it-cache.yaml", "gemma3-1b-it-fpo.yaml"} <= names


@pytest.mark.parametrize("path", CACHE_CONFIGS, ids=lambda p: p.name)
def test_cache_example_names_a_registry_sae_at_its_layer(path):
    cfg = load_config(CacheConfig, path)
    model, hook = registry_hook_name(cfg.sae.source, cfg.sae.sae_id)
    assert hook == f"blocks.{cfg.sae.layer}.hook_resid_post", (path.name, hook)
    assert _family(model) == _family(cfg.model.name_or_path), (path.name, model, cfg.model.name_or_path)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_example_parses_and_trains_from_an_example_cache(path):
    cfg = load_config(TrainConfig, path)
    outputs = {load_config(CacheConfig, p).output for p in CACHE_CONFIGS}
    assert cfg.cache in outputs, f"{path.name}: cache {cfg.cache} is none of the example caches' outputs"


def test_registry_check_catches_a_wrong_layer():
    _, hook = registry_hook_name("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium")
    assert hook == "blocks.13.hook_resid_post"
    _, hook = registry_hook_name("gemma-scope-2b-pt-res-canonical", "layer_25/width_16k/canonical")
    assert hook == "blocks.25.hook_resid_post"
    with pytest.raises(AssertionError, match="has no SAE"):
        registry_hook_name("gemma-scope-2-1b-it-res", "layer_14_width_16k_l0_medium")
