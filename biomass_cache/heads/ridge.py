"""`ridge`: a closed-form readout (no gradient steps): pooled tokens -> robust scaling -> ridge, fitted in seconds.

Per layer the tokens are pooled by mean, max, min and a shifted GeM (`pool_tokens`); the layers' pooled vectors are
concatenated, scaled by the training fold's median and interquartile range (sklearn's RobustScaler), and two ridge
regressions read them: one of log1p(grams) and one of g/m^2 of the three components. Each target column gets its own
alpha and the two are blended with one weight, both chosen by an inner cross-validation grouped by visit (the views
of an image, and the images of a visit, never sit on both sides). The fitted map lives in buffers, so checkpoints,
`rebuild_head`, prediction and ensembles use the module's forward like any other head.

Training (`biomass_cache.train.loop.fit_closed_form`) calls `pooled(tokens)` on every stored view of the training images
once, then `fit(features, y, groups)`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import RobustScaler

from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import components_to_targets, to_density, to_grams
from biomass_cache.heads.common import FusedHead
from biomass_cache.heads.registry import register_head

POOLS = ("mean", "max", "min", "gem")
GEM_P = 3.0
ALPHAS = tuple(float(a) for a in np.logspace(-4, 2, 13))  # x the mean squared norm of a centred feature row
BLENDS = tuple(k / 10 for k in range(11))  # candidate weights of the log1p model


def shifted_gem(tokens: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """(B, T, C) -> (B, C): m + mean((x - m)^p)^(1/p), m the per-image, per-channel minimum over the tokens.

    GeM needs non-negative inputs; clamping signed tokens at eps would discard every negative value. Measured from
    the image's own minimum the values are >= 0 with nothing lost, and the result is a power mean of signed tokens:
    between the mean and the max, equal to the value for a constant channel, and shift-equivariant
    (GeM(x + c) = GeM(x) + c), so it needs no statistic fitted on other images.
    """
    low = tokens.amin(dim=1, keepdim=True)
    return low[:, 0] + (tokens - low).pow(p).mean(dim=1).pow(1.0 / p)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, T, C) -> (B, L, 4C): mean, max, min and shifted GeM over the tokens of each layer."""
    x = tokens.float()
    b, n_layers, t, c = x.shape
    flat = x.reshape(b * n_layers, t, c)
    pooled = [flat.mean(dim=1), flat.amax(dim=1), flat.amin(dim=1), shifted_gem(flat)]
    return torch.cat(pooled, dim=-1).reshape(b, n_layers, len(POOLS) * c)


def kernel_ridge_cv(k: torch.Tensor, y: torch.Tensor, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                    alphas: torch.Tensor) -> torch.Tensor:
    """Out-of-fold predictions (A, n, m) of ridge with intercept for every alpha, from the Gram matrix `k` (n, n).

    Ridge in its dual form: for each inner fold the training Gram matrix is centred on that fold's feature mean and
    diagonalised once, which gives every alpha's solution for the price of one (sklearn's Ridge would rebuild the
    Gram matrix per alpha and fold).
    """
    out = torch.empty(len(alphas), *y.shape, dtype=k.dtype, device=k.device)
    for tr, va in splits:
        tr, va = torch.as_tensor(tr, device=k.device), torch.as_tensor(va, device=k.device)
        ktt, kvt = k[tr][:, tr], k[va][:, tr]
        rows, grand = ktt.mean(dim=1), ktt.mean()
        kc = ktt - rows[:, None] - rows[None, :] + grand
        kvc = kvt - kvt.mean(dim=1, keepdim=True) - rows[None, :] + grand
        s, u = torch.linalg.eigh(kc)
        y_mean = y[tr].mean(dim=0)
        uty = u.T @ (y[tr] - y_mean)
        coef = uty[None] / (s.clamp_min(0)[None, :, None] + alphas[:, None, None])  # (A, n_tr, m)
        out[:, va] = (kvc @ u) @ coef + y_mean
    return out


def ridge_fit(x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (F, m) and intercepts (m,) of ridge regressions of y (n, m) on x (n, F), column j with alpha j;
    the intercept is not penalised (as sklearn's Ridge(fit_intercept=True))."""
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc = x - x_mean
    s, u = torch.linalg.eigh(xc @ xc.T)
    dual = u @ ((u.T @ (y - y_mean)) / (s.clamp_min(0)[:, None] + alphas[None, :]))
    weight = xc.T @ dual
    return weight, y_mean - x_mean @ weight


@register_head("ridge")
class RidgeHead(FusedHead):
    """Pooled tokens of every layer -> robust scaling -> ridge on log1p(grams) and on g/m^2, blended; fitted by
    `fit`, never by gradients (`closed_form`). Every layer reports the same components (one map reads them all)."""

    closed_form = True

    def __init__(self, *, alphas: Sequence[float] = ALPHAS, inner_folds: int = 5, blend: float | None = None,
                 **common):
        if common.get("dropout", 0.0):
            raise ValueError(f"ridge head: has no dropout, got dropout={common['dropout']}")
        if any((common.get("aux") or {}).values()):
            raise ValueError("ridge head: no auxiliary tasks (it fits the three components in closed form); "
                             "train it without --aux / aux = true")
        if common.get("interval"):
            raise ValueError("ridge head: no interval classification (it takes no gradient steps); "
                             "train it without --interval-bins / interval_bins")
        common["dropout"] = 0.0
        super().__init__(features=len(POOLS) * common["channels"], **common)
        alphas = [float(a) for a in alphas]
        if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
            raise ValueError(f"ridge head: alphas must be numbers > 0, got {alphas}")
        if int(inner_folds) < 2:
            raise ValueError(f"ridge head: inner_folds must be at least 2, got {inner_folds}")
        if blend is not None and not 0.0 <= blend <= 1.0:
            raise ValueError(f"ridge head: blend (weight of the log1p model) must be in [0, 1] or None, got {blend}")
        self._set_config(alphas=alphas, inner_folds=int(inner_folds), blend=blend)
        self.fusion_logits.requires_grad_(False)  # every layer gives the same prediction: nothing to fuse
        n_features = self.n_layers * len(POOLS) * self.channels
        self.register_buffer("center", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.register_buffer("weight", torch.zeros(n_features, 6))  # columns: 3 x log1p(grams), 3 x g/m^2
        self.register_buffer("bias", torch.zeros(6))
        self.register_buffer("log_weight", torch.tensor(0.5))  # blend weight of the log1p model
        self.register_buffer("alpha", torch.zeros(6))  # the chosen (absolute) alphas, for the record

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, T, C) tokens -> (B, L * 4C) features the ridge reads."""
        self.check_tokens(tokens)
        return pool_tokens(tokens).flatten(1)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B, 3) components g/m^2 >= 0."""
        return blend(((features - self.center) / self.scale) @ self.weight + self.bias, self.log_weight)

    def layer_components(self, tokens: torch.Tensor, return_maps: bool) -> tuple[torch.Tensor, None, torch.Tensor]:
        features = pool_tokens(tokens)
        comps = self.predict_features(features.flatten(1))
        return comps[:, None].expand(-1, self.n_layers, -1), None, features

    @torch.no_grad()
    def fit(self, features: torch.Tensor, y: torch.Tensor, groups: np.ndarray) -> dict:
        """Fit scaler, alphas, ridge maps and blend on (n, F) features, y (n, 3) components g/m^2 (finite) and the
        group (visit) of each sample; returns what was chosen and the inner-CV score."""
        n_groups = len(np.unique(groups))
        if n_groups < 2 or len(features) < 4:
            raise ValueError(f"ridge head: the inner cross-validation needs at least 2 groups and 4 samples, got "
                             f"{n_groups} group(s) and {len(features)} sample(s)")
        device = features.device
        scaler = RobustScaler().fit(features.double().cpu().numpy())
        center = torch.as_tensor(scaler.center_, device=device)
        scale = torch.as_tensor(scaler.scale_, device=device)
        x = (features.double() - center) / scale
        y = y.double()
        targets = torch.cat([torch.log1p(to_grams(y)), y], dim=1)
        gram = x @ x.T
        grid = torch.tensor(self.config["alphas"], dtype=x.dtype, device=device) * (
            gram.diagonal().sum() - gram.sum() / len(x)).clamp_min(1e-12) / len(x)  # x mean sq. norm of a centred row
        inner = GroupKFold(n_splits=min(self.config["inner_folds"], n_groups))
        splits = list(inner.split(np.zeros((len(x), 1)), groups=groups))
        oof = kernel_ridge_cv(gram, targets, splits, grid)  # (A, n, 6)
        best = ((oof - targets) ** 2).mean(dim=1).argmin(dim=0)  # per column
        chosen = oof[best, :, torch.arange(6, device=device)].T  # (n, 6)
        truth = to_grams(components_to_targets(y.cpu().numpy()))
        blends = BLENDS if self.config["blend"] is None else (self.config["blend"],)
        r2 = {w: competition_r2(truth, to_grams(components_to_targets(blend(chosen, w).cpu().numpy())))
              for w in blends}
        w = max(r2, key=r2.get)
        weight, bias = ridge_fit(x, targets, grid[best])
        for name, value in (("center", center), ("scale", scale), ("weight", weight), ("bias", bias),
                            ("log_weight", torch.tensor(w)), ("alpha", grid[best])):
            getattr(self, name).copy_(value)
        return {"alpha": grid[best].tolist(), "log_weight": w, "inner_cv_competition_r2": r2[w]}


def blend(pred: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """(n, 6) log1p(grams) + g/m^2 predictions -> (n, 3) components g/m^2 >= 0, w on the log1p model."""
    return (w * to_density(torch.expm1(pred[:, :3])) + (1 - w) * pred[:, 3:]).clamp_min(0)
