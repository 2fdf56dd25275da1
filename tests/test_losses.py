"""Losses: manifold mixup, masked task losses on hand cases, uncertainty weighting, PCGrad, a tiny overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import biomass_cache.heads as heads
from biomass_cache.train.losses import (
    UncertaintyWeighting, combine_losses, manifold_mixup, pcgrad_step, split_terms, task_losses,
)
from biomass_cache.common.targets import WEIGHTS, ZScore, components_to_targets, to_grams

B, L, T, C, N_STATES = 6, 2, 4, 3, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zscore() -> ZScore:
    rng = np.random.default_rng(0)
    return ZScore.fit(components_to_targets(rng.gamma(2.0, 60.0, size=(50, 3))))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = components_to_targets(torch.rand(B, 3, generator=g) * 200)
    return {
        "tokens": torch.arange(B, dtype=torch.float32)[:, None, None, None] + torch.rand(B, L, T, C, generator=g) * 0.1,
        "y": y,
        "y_mask": torch.rand(B, 5, generator=g) > 0.3,
        "height": torch.rand(B, generator=g) * 20,
        "height_mask": torch.tensor([True, False, True, True, False, True]),
        "ndvi_z": torch.randn(B, generator=g),
        "ndvi_mask": torch.tensor([True, True, False, True, True, True]),
        "state": torch.tensor([0, 2, -1, 1, 0, 2]),
        "index": torch.arange(B),
    }


def recover_perm(batch: dict, mixed: dict) -> torch.Tensor:
    """Sample k's tokens are ~k, so the partner index is readable from the mixed tokens."""
    lam = float(mixed["mixup_lambda"])
    partner = (mixed["tokens"][:, 0, 0, 0] - lam * batch["tokens"][:, 0, 0, 0]) / (1 - lam)
    return partner.round().long()


def test_mixup_prob_zero_is_identity():
    batch = make_batch()
    mixed = manifold_mixup(batch, alpha=3.9, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert float(mixed["mixup_lambda"]) == 1.0
    for key, value in batch.items():
        assert torch.equal(mixed[key], value), key


def test_mixup_mixes_linearly_with_anded_masks_and_soft_states():
    batch = {**make_batch(), "weight": torch.linspace(0.25, 1.0, B)}
    mixed = manifold_mixup(batch, alpha=3.9, prob=1.0, generator=torch.Generator().manual_seed(3), n_states=N_STATES)
    lam = float(mixed["mixup_lambda"])
    assert 0.0 < lam < 1.0
    perm = recover_perm(batch, mixed)
    assert sorted(perm.tolist()) == list(range(B))
    assert torch.allclose(mixed["tokens"], lam * batch["tokens"] + (1 - lam) * batch["tokens"][perm])
    for key in ("y_mask", "height_mask", "ndvi_mask"):
        assert torch.equal(mixed[key], batch[key] & batch[key][perm]), key
    for key in ("y", "height", "ndvi_z", "weight"):
        assert torch.allclose(mixed[key], lam * batch[key] + (1 - lam) * batch[key][perm]), key
    clover, dead, green, gdm, total = mixed["y"].unbind(-1)
    assert torch.allclose(gdm, clover + green) and torch.allclose(total, clover + dead + green)
    known = batch["state"] >= 0
    assert torch.equal(mixed["state_mask"], known & known[perm])
    ok = mixed["state_mask"]
    assert torch.allclose(mixed["state_soft"][ok].sum(-1), torch.ones(int(ok.sum())))
    assert torch.equal(batch["y"], make_batch()["y"])  # the input batch is untouched


def test_mixup_is_deterministic_given_the_generator():
    batch = make_batch()
    runs = [manifold_mixup(batch, 3.9, 0.96, torch.Generator().manual_seed(s), N_STATES) for s in (7, 7, 8)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["tokens"], runs[2]["tokens"])


def test_mixup_lambda_distribution_and_probability():
    g = torch.Generator().manual_seed(0)
    batch = make_batch()
    lams = np.array([float(manifold_mixup(batch, 3.9, 0.5, g)["mixup_lambda"]) for _ in range(300)])
    applied = lams < 1.0
    assert 0.38 < applied.mean() < 0.62
    assert abs(lams[applied].mean() - 0.5) < 0.05 and lams[applied].std() > 0.1


def out_for(batch: dict, zscore: ZScore, comps: torch.Tensor, requires_grad: bool = False) -> dict:
    """Head-like outputs built from given component densities."""
    comps = comps.clone().requires_grad_(requires_grad)
    total = comps.sum(-1)
    mean, std = torch.tensor(zscore.mean, dtype=torch.float32), torch.tensor(zscore.std, dtype=torch.float32)
    return {"components": comps, "total_z": (total - mean[4]) / std[4], "ratio": comps / total[:, None],
            "five_z": (components_to_targets(comps) - mean) / std, "height": torch.full((len(comps),), 10.0),
            "ndvi_z": torch.zeros(len(comps)), "state_logits": torch.zeros(len(comps), N_STATES), "_leaf": comps}


def test_all_masked_losses_are_zero_with_finite_grads(zscore):
    batch = make_batch()
    batch.update(y=torch.zeros(B, 5), y_mask=torch.zeros(B, 5, dtype=torch.bool),
                 height_mask=torch.zeros(B, dtype=torch.bool), ndvi_mask=torch.zeros(B, dtype=torch.bool),
                 state=torch.full((B,), -1))
    out = out_for(batch, zscore, torch.rand(B, 3) * 100, requires_grad=True)
    losses = task_losses(out, batch, zscore)
    assert set(losses) == {"total", "ratio", "five", "height", "ndvi", "state"}
    assert all(float(v.detach()) == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(out["_leaf"].grad).all()


def test_hand_computed_total_ratio_five(zscore):
    comps_true = torch.tensor([[10.0, 20.0, 70.0], [50.0, 0.0, 50.0]])
    y = components_to_targets(comps_true)
    y_mask = torch.ones(2, 5, dtype=torch.bool)
    y_mask[1, 1] = False  # sample 1 lacks dead: its ratio is unsupervised, its total still counts
    batch = {"y": torch.where(y_mask, y, 0.0), "y_mask": y_mask}
    comps = torch.tensor([[20.0, 20.0, 60.0], [40.0, 10.0, 70.0]])
    out = out_for(batch, zscore, comps)
    losses = task_losses({k: out[k] for k in ("total_z", "ratio", "five_z")}, batch, zscore)
    assert set(losses) == {"total", "ratio", "five"}
    s, m = zscore.std, zscore.mean
    assert math.isclose(float(losses["total"]), ((0 / s[4]) ** 2 + (20 / s[4]) ** 2) / 2, rel_tol=1e-5)
    assert math.isclose(float(losses["ratio"]), (0.1**2 + 0 + 0.1**2) / 3, rel_tol=1e-5)
    err = ((components_to_targets(comps) - y).numpy() / s) ** 2 * np.array(WEIGHTS)
    w = np.array(WEIGHTS) * y_mask.numpy()
    assert math.isclose(float(losses["five"]), float((err * y_mask.numpy()).sum() / w.sum()), rel_tol=1e-5)
    assert m.shape == (5,)


def test_sample_weights_hand_case(zscore):
    """Weights 1 and 0.25: every loss is the weighted mean of the two samples' errors; weights 1 change nothing."""
    comps_true = torch.tensor([[10.0, 20.0, 70.0], [50.0, 10.0, 40.0]])
    batch = {"y": components_to_targets(comps_true), "y_mask": torch.ones(2, 5, dtype=torch.bool)}
    comps = torch.tensor([[20.0, 20.0, 60.0], [40.0, 10.0, 70.0]])
    out = {k: v for k, v in out_for(batch, zscore, comps).items() if k in ("total_z", "ratio", "five_z")}
    weighted = task_losses(out, {**batch, "weight": torch.tensor([1.0, 0.25])}, zscore)
    for task in ("total", "ratio"):  # per-sample errors: (e0 + 0.25 e1) / 1.25
        e = [task_losses({k: v[[i]] for k, v in out.items()}, {k: v[[i]] for k, v in batch.items()}, zscore)[task]
             for i in range(2)]
        assert math.isclose(float(weighted[task]), float((e[0] + 0.25 * e[1]) / 1.25), rel_tol=1e-5)
    s = zscore.std
    err = ((components_to_targets(comps) - batch["y"]).numpy() / s) ** 2 * np.array(WEIGHTS)
    expected = (err[0].sum() + 0.25 * err[1].sum()) / (1.25 * sum(WEIGHTS))
    assert math.isclose(float(weighted["five"]), float(expected), rel_tol=1e-5)
    plain, ones = task_losses(out, batch, zscore), task_losses(out, {**batch, "weight": torch.ones(2)}, zscore)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)


def test_hand_computed_aux_losses(zscore):
    batch = make_batch()
    out = out_for(batch, zscore, torch.rand(B, 3) * 100)
    logits = torch.randn(B, N_STATES)
    out["state_logits"] = logits
    losses = task_losses(out, batch, zscore)
    hm = batch["height_mask"]
    assert torch.isclose(losses["height"], (((10.0 - batch["height"][hm]) / 10.0) ** 2).mean())
    nm = batch["ndvi_mask"]
    assert torch.isclose(losses["ndvi"], (batch["ndvi_z"][nm] ** 2).mean())
    known = batch["state"] >= 0
    assert torch.isclose(losses["state"], F.cross_entropy(logits[known], batch["state"][known]))
    soft = manifold_mixup(batch, 3.9, 0.0, torch.Generator().manual_seed(0), N_STATES)  # one-hot soft labels
    assert torch.isclose(task_losses(out, soft, zscore)["state"], losses["state"])


def test_uncertainty_weighting_hand_case():
    uw = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    total, terms = uw({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    expected = (0.5 * (2.0 + 0.0) + 0.5 * (3.0 / 2.0 + math.log(2.0))) / 2
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-6)
    assert math.isclose(float(sum(terms.values()).detach()), expected, rel_tol=1e-6)
    total.backward()
    assert torch.allclose(uw.log_vars.grad, torch.tensor([0.5 * (1 - 2.0), 0.5 * (1 - 1.5)]) / 2)
    with pytest.raises(ValueError, match="built for tasks"):
        uw({"a": torch.tensor(1.0)})
    plain, plain_terms = combine_losses({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, uw=None)
    assert float(plain) == 5.0 and set(plain_terms) == {"a", "b"}


def test_pcgrad_projects_conflicting_and_keeps_agreeing_aux_gradients():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.3]))
    s = torch.nn.Parameter(torch.tensor(0.2))  # a plain parameter (like a UW log-variance)
    g_p = torch.tensor([1.0, 0.0])
    conflicting, agreeing = torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 2.0])
    primary = [(g_p * p).sum() * torch.exp(s)]
    pcgrad_step(primary, [(conflicting * p).sum(), (agreeing * p).sum()], [p], plain_params=[s])
    projected = conflicting - (conflicting @ g_p) * g_p  # (0, 1)
    assert projected @ g_p >= -1e-6
    g_primary = g_p * math.exp(0.2)
    projected = conflicting - (conflicting @ g_primary) / (g_primary @ g_primary) * g_primary
    assert torch.allclose(p.grad, g_primary + projected + agreeing, atol=1e-6)
    assert torch.allclose(s.grad, (g_p * p).sum().detach() * math.exp(0.2))
    q = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    pcgrad_step([(g_p * q).sum()], [(agreeing * q).sum()], [q])
    assert torch.allclose(q.grad, g_p + agreeing)


def test_split_terms_orders_primary_and_auxiliary():
    terms = {t: torch.tensor(float(k)) for k, t in enumerate(["state", "five", "total", "ratio", "height"])}
    primary, aux = split_terms(terms)
    assert [float(x) for x in primary] == [2.0, 3.0, 1.0] and [float(x) for x in aux] == [4.0, 0.0]
    with pytest.raises(ValueError, match="unknown task terms"):
        split_terms({"oops": torch.tensor(1.0)})


@pytest.mark.slow
def test_density_head_overfits_a_synthetic_batch(zscore):
    torch.manual_seed(0)
    batch = make_batch(seed=1)
    batch["y_mask"] = torch.ones(B, 5, dtype=torch.bool)
    batch["tokens"] = torch.randn(B, L, T, C)
    head = heads.create_head("density", n_layers=L, channels=C, grid=(2, 2), zscore=zscore, hidden=32,
                             aux=dict(height=True, ndvi=True, n_states=N_STATES), dropout=0.0)
    uw = UncertaintyWeighting(["total", "ratio", "five", "height", "ndvi", "state"])
    opt = torch.optim.Adam([{"params": head.parameters(), "lr": 1e-2}, {"params": uw.parameters(), "lr": 1e-2}])
    history = []
    for _ in range(200):
        losses = task_losses(head(batch["tokens"]), batch, zscore)
        _, terms = combine_losses(losses, uw)
        primary, aux = split_terms(terms)
        opt.zero_grad()
        pcgrad_step(primary, aux, list(head.parameters()), plain_params=list(uw.parameters()))
        opt.step()
        history.append(float(losses["five"].detach()))
    assert history[-1] < history[0] / 10, (history[0], history[-1])


INTERVAL = torch.tensor([[0, 1, 2, 2, 2], [2, 2, -1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 1, -1, 2], [2, 1, 0, 1, 1],
                         [1, 1, 1, 1, 1]])  # (B, 5) bin indices of 3 bins, -1 = unknown


def test_mixup_mixes_interval_bins_as_soft_labels():
    batch = {**make_batch(), "interval": INTERVAL}
    plain = manifold_mixup(batch, 3.9, 0.0, torch.Generator().manual_seed(3), n_bins=3)
    assert torch.equal(plain["interval_soft"], F.one_hot(INTERVAL.clamp_min(0), 3).float())
    assert torch.equal(plain["interval_mask"], INTERVAL >= 0)
    mixed = manifold_mixup(batch, 3.9, 1.0, torch.Generator().manual_seed(3), n_bins=3)
    lam, perm = float(mixed["mixup_lambda"]), recover_perm(batch, mixed)
    i = int(torch.nonzero(perm != torch.arange(B))[0])  # a sample mixed with another one
    for t in range(5):
        mine, theirs = int(INTERVAL[i, t]), int(INTERVAL[perm[i], t])
        want = torch.zeros(3)
        want[max(mine, 0)] += lam
        want[max(theirs, 0)] += 1 - lam
        assert torch.allclose(mixed["interval_soft"][i, t], want), (t, mine, theirs)
        assert bool(mixed["interval_mask"][i, t]) == (mine >= 0 and theirs >= 0)
    assert torch.equal(mixed["interval_mask"], (INTERVAL >= 0) & (INTERVAL[perm] >= 0))


def test_hand_computed_interval_loss(zscore):
    batch = {**make_batch(), "interval": INTERVAL}
    logits = torch.randn(B, 5, 3, generator=torch.Generator().manual_seed(0))
    out = {**out_for(batch, zscore, torch.rand(B, 3) * 100), "interval_logits": logits}
    loss = task_losses(out, batch, zscore, interval_weight=0.3)["interval"]
    known = INTERVAL >= 0
    assert torch.isclose(loss, 0.3 * F.cross_entropy(logits[known], INTERVAL[known]))
    mixed = manifold_mixup(batch, 3.9, 1.0, torch.Generator().manual_seed(3), n_bins=3)
    lam, perm = float(mixed["mixup_lambda"]), recover_perm(batch, mixed)
    both = known & known[perm]
    ce = lambda labels: F.cross_entropy(logits[both], labels[both])  # noqa: E731
    assert torch.isclose(task_losses(out, mixed, zscore)["interval"], lam * ce(INTERVAL) + (1 - lam) * ce(INTERVAL[perm]))


def test_interval_task_trains_with_uw_and_pcgrad(zscore):
    """Through train_step (mixup, UW, PCGrad): the CE falls on a memorisable batch, its gradient reaches the
    classifier, it is a task of UW and PCGrad arbitrates it against the primary tasks on the shared features."""
    from biomass_cache.train.dataset import AuxSpec
    from biomass_cache.train.loop import build_member, train_step
    from biomass_cache.train.config import TrainConfig

    batch = make_batch(seed=1)
    batch.update(y_mask=torch.ones(B, 5, dtype=torch.bool), tokens=torch.randn(B, L, T, C))
    grams = to_grams(batch["y"].double().numpy())
    cfg = TrainConfig(head="density", head_kwargs={"hidden": 16}, interval_bins=3, uw=True, pcgrad=True, mixup=True,
                      ema=False, lr=1e-2)
    m = build_member("density", cfg, list(range(L)), {"channels": C, "grid": [2, 2]}, zscore,
                     AuxSpec((), 0.0, 1.0), 80, seed=0, device=torch.device("cpu"), train_grams=grams)
    assert m.uw.tasks == ["total", "ratio", "five", "interval"]

    def ce() -> float:
        with torch.no_grad():
            labels = m.head.interval_head.labels(batch["y"], batch["y_mask"])
            return float(task_losses(m.head.eval()(batch["tokens"]), {**batch, "interval": labels}, zscore)["interval"])

    before = ce()
    labels = m.head.interval_head.labels(batch["y"], batch["y_mask"])
    assert sorted(labels[:, 0].tolist()) == [0, 0, 1, 1, 2, 2]  # quantile bins of the 6 training values
    train_step(m, {k: v for k, v in batch.items() if k != "tokens"}, batch["tokens"])
    arbitrated, plain = m.pcgrad_split
    classifier = m.head.interval_head.out.weight
    assert any(p is m.head.weight1 for p in arbitrated)  # shared: PCGrad arbitrates it
    assert any(p is classifier for p in plain) and classifier.grad is not None and classifier.grad.abs().sum() > 0
    assert m.uw.log_vars.grad[3] != 0
    for _ in range(79):
        train_step(m, {k: v for k, v in batch.items() if k != "tokens"}, batch["tokens"])
    assert ce() < 0.5 * before, (before, ce())
