"""The last mile's recipe: blend weights, a temperature and a clip bound, fitted and judged on honest predictions
only (a K-fold model's out-of-fold predictions, or a single-split model's predictions of split.csv's valid rows).
The log loss reported for a recipe is cross-fitted: the judged rows are cut into folds and each fold's predictions
come from weights, temperature and clip fitted on the other folds only.

Used by: 07 (--blend, --calibrate temperature, --clip auto, --tta's logit mean), its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import LOGIT_EPS
from .models import log_loss

CLIP_GRID = np.round(np.arange(0.001, 0.0505, 0.001), 3)  # --clip auto's candidates: 0.001 ... 0.05


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p kept off 0 and 1 (float32's sigmoid saturates there)."""
    p = np.clip(np.asarray(p, np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p / (1 - p))


def fit_blend(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 (one per column of `preds`) minimising the blend's log loss."""
    from scipy.optimize import minimize
    k = preds.shape[1]
    if k == 1:
        return np.ones(1)
    result = minimize(lambda w: log_loss(y, preds @ w), np.full(k, 1 / k), method="SLSQP",
                      bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                      options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(result.x, 0, None)
    return w / w.sum()


def scale_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens overconfident predictions, T < 1 sharpens."""
    return 1 / (1 + np.exp(-logit(p) / temperature))


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature (1/20 to 20) with the lowest log loss (Guo et al. 2017, one parameter)."""
    from scipy.optimize import minimize_scalar
    result = minimize_scalar(lambda t: log_loss(y, scale_temperature(p, np.exp(t))), bounds=(-3, 3),
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def auto_clip(p: np.ndarray, y: np.ndarray) -> float:
    """The bound c of CLIP_GRID whose clip to [c, 1 - c] gives the lowest log loss (the smallest on a tie)."""
    losses = [log_loss(y, p, (c, 1 - c)) for c in CLIP_GRID]
    return float(CLIP_GRID[int(np.argmin(losses))])


@dataclass
class Recipe:
    """What turns the models' predictions into the submitted ones: weights, then temperature, then clip."""
    weights: np.ndarray
    temperature: float
    clip: tuple[float, float]

    def stages(self, preds: np.ndarray) -> dict[str, np.ndarray]:
        """The predictions after each stage: 'blend', 'calibrated', 'clipped'."""
        blend = preds @ self.weights
        calibrated = scale_temperature(blend, self.temperature) if self.temperature != 1 else blend
        return {"blend": blend, "calibrated": calibrated, "clipped": np.clip(calibrated, *self.clip)}


def fit_recipe(preds: np.ndarray, y: np.ndarray, calibrate: bool, clip: tuple[float, float] | None) -> Recipe:
    """Fit the weights, then (`calibrate`) the temperature on the blend, then (`clip` None: auto) the clip."""
    weights = fit_blend(preds, y)
    temperature = fit_temperature(preds @ weights, y) if calibrate else 1.0
    if clip is None:
        c = auto_clip(Recipe(weights, temperature, (0, 1)).stages(preds)["calibrated"], y)
        clip = (c, 1 - c)
    return Recipe(weights, temperature, clip)


def cross_fit(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, fit) -> dict[str, np.ndarray]:
    """Each stage's predictions of every row by a recipe `fit(preds, y)` fitted without the row's fold: the
    labels of a row never shape its own prediction."""
    out = {}
    for k in np.unique(folds):
        held = folds == k
        for stage, p in fit(preds[~held], y[~held]).stages(preds[held]).items():
            out.setdefault(stage, np.zeros(len(y)))[held] = p
    return out
