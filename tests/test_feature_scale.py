"""The feature-scale study's split of FPO's D into threshold crossings and continuous change (bench/feature_scale.py):
D equals the project's own ``feature_distance`` (the loss's D), and the three parts add up to it exactly."""

from __future__ import annotations

import torch

from bench.feature_scale import decompose
from fpo_dist.losses import PooledCodes, SparseCodes, feature_distance


def _pre(seed, shape=(3, 7, 40)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_d_is_the_loss_distance_and_the_parts_add_up():
    pre_r = _pre(0)
    pre_p = pre_r + 0.3 * _pre(1)  # moved: some units cross their threshold, others change continuously
    theta = torch.linspace(0.2, 1.2, 40, dtype=torch.float64)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 2:6] = True
    mask[1, 6] = True  # rows of different response lengths
    k = 5
    parts = decompose(pre_p, pre_r, theta, mask, k)
    oracle, _ = feature_distance(PooledCodes(parts["pooled_p"]), SparseCodes.from_dense(parts["pooled_r"]), k)
    torch.testing.assert_close(parts["D"], oracle)
    torch.testing.assert_close(parts["D_cont"] + parts["D_cross"] + parts["D_mixed"], parts["D"])
    assert (parts["D_cross"] > 0).all() and (parts["D_cont"] > 0).all()


def test_no_crossing_when_every_unit_keeps_its_state():
    pre_r = _pre(2).abs() + 1.0  # all above a threshold of 0.5
    pre_p = pre_r + 0.1 * _pre(3).clamp(-1, 1)  # never falls below it
    parts = decompose(pre_p, pre_r, torch.full((40,), 0.5, dtype=torch.float64),
                      torch.ones(3, 7, dtype=torch.bool), 10)
    assert float(parts["D_cross"].abs().max()) == 0.0 and float(parts["D_mixed"].abs().max()) == 0.0
    torch.testing.assert_close(parts["D_cont"], parts["D"])


def test_pure_crossing_when_only_thresholds_are_crossed():
    pre_r = _pre(4)
    theta = torch.zeros(40, dtype=torch.float64)
    pre_p = -pre_r  # every active unit turns off and every inactive one on
    parts = decompose(pre_p, pre_r, theta, torch.ones(3, 7, dtype=torch.bool), 10)
    assert float(parts["D_cont"].abs().max()) == 0.0
    torch.testing.assert_close(parts["D_cross"], parts["D"])


def test_run_fpo_starts_at_zero_and_logs_both_terms(tiny):
    """The study's loop on the tiny model: at step 0 the policy is the reference, so D_w, D_l, both terms of u and
    their magnitudes are 0 and the loss is log 2; every step records the fields the report reads."""
    import math

    from bench.feature_scale import run_fpo
    from fpo_dist.sae import load_sae

    sae = load_sae(str(tiny.sae_dir))
    g = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(3, 60, (n,), generator=g).tolist() for n in (5, 4, 4)) for _ in range(8)]
    records = run_fpo(tiny.model_dir, sae, tiny.hook_layer, pairs, steps=2, log=lambda *_: None)
    first = records[0]
    for key in ("D_chosen", "D_rejected", "feature_term", "feature_term_abs", "reward_margin", "reward_margin_abs"):
        assert first[key] == 0.0, (key, first[key])
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-6)
    assert set(records[1]) >= {"D_cont_rejected", "D_cross_rejected", "D_mixed_rejected", "grad_norm", "step_s"}
