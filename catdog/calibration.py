"""Calibrated probabilities: temperature scaling and ensemble weights, both fitted on validation log loss.

Pure math on tensors and arrays (the bottom layer: no catdog imports).  Training fits a model's
temperature from sums it accumulates during its validation pass (:func:`log_loss_sums`, summed over
batches and ranks, then :func:`pick_temperature`); the validation study fits ensemble weights from
the members' calibrated probabilities (:func:`fit_ensemble_weights`).
"""

from __future__ import annotations

import numpy as np
import torch

CLIP = (0.005, 0.995)  # Kaggle Redux: one confident mistake must not explode log loss
# Log-spaced temperatures from 1/4 to 16 in steps of 2**0.05 (~3.5%); 1.0 is on the grid (index 40).
# Up to 16: a model stopped after an epoch or two is often far over-confident (4 was the edge).
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 121))
# A member left below this weight is dropped (predict does not score a weight-0 member) and the rest
# re-fitted: at 0.02 it would move a probability by at most 0.02.
ENSEMBLE_MIN_WEIGHT = 0.02
ENSEMBLE_STEPS = 500


def log_loss_sums(margins: torch.Tensor, labels: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """For each temperature T, the summed clipped log loss of p(dog) = sigmoid(margin / T), where
    ``margin`` = logit(dog) - logit(cat) (so T = 1 is the model's own softmax).  Float64 sums,
    on the margins' device: add them up over batches and ranks, then :func:`pick_temperature`."""
    probs = torch.sigmoid(margins.double()[None, :] / temperatures.double()[:, None]).clamp(*CLIP)
    dog = labels.double()[None, :]
    return -(dog * probs.log() + (1 - dog) * (1 - probs).log()).sum(dim=1)


def pick_temperature(temperatures, loss_sums, n_images: int) -> tuple[float, float]:
    """The temperature with the lowest log loss and that log loss (mean over ``n_images``).  Ties
    (a model whose margins are all 0) go to the temperature nearest 1."""
    temps, losses = np.asarray(temperatures, dtype=np.float64), np.asarray(loss_sums, dtype=np.float64)
    losses = losses / max(n_images, 1)
    tied = np.flatnonzero(losses <= losses.min() * (1 + 1e-12))
    best = tied[np.argmin(np.abs(np.log(temps[tied])))]
    return float(temps[best]), float(losses[best])


def view_probs(margins: np.ndarray, temperature: float) -> np.ndarray:
    """p(dog) as predict computes it from ``margins`` (views, images): each view's sigmoid(margin / T),
    averaged over the views (one view, or an image and its flip under TTA)."""
    return (1 / (1 + np.exp(-np.asarray(margins, dtype=np.float64) / temperature))).mean(axis=0)


def fit_view_temperature(margins: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The temperature (on :data:`TEMPERATURES`) with the lowest log loss of :func:`view_probs`, and that log loss."""
    losses = [clipped_log_loss(view_probs(margins, t), labels) * len(labels) for t in TEMPERATURES]
    return pick_temperature(TEMPERATURES, losses, len(labels))


def clipped_log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean clipped binary log loss of p(dog) ``probs`` against 0/1 ``labels``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), *CLIP)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_ensemble_weights(member_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights on the simplex that minimise the validation log loss of the weighted mean of the
    members' calibrated p(dog), ``member_probs`` (members, images).

    That loss is convex in the weights (minus the log of a linear function of them), so
    exponentiated-gradient descent from equal weights reaches its minimum, interior ones included:
    the greedy selection with replacement this replaced (Caruana et al., 2004) could only add a second
    member at weight 1/2, so a weaker member that helps at a small weight got 0.
    Members left below ``ENSEMBLE_MIN_WEIGHT`` are dropped, the smallest first, and the rest
    re-fitted.  The best single member is the fallback, so on this data the ensemble is never worse
    than it."""
    probs = np.asarray(member_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    active = np.arange(len(probs))
    while True:
        fitted = descend_mixture(np.clip(probs[active], *CLIP), y)
        if len(active) == 1 or fitted.min() >= ENSEMBLE_MIN_WEIGHT:
            break
        active = np.delete(active, int(np.argmin(fitted)))
    weights = np.zeros(len(probs))
    weights[active] = fitted
    best = int(np.argmin([clipped_log_loss(p, labels) for p in probs]))
    if clipped_log_loss(weights @ probs, labels) > clipped_log_loss(probs[best], labels):
        weights = np.eye(len(probs))[best]
    return weights


def descend_mixture(probs: np.ndarray, y: np.ndarray, steps: int = ENSEMBLE_STEPS) -> np.ndarray:
    """Exponentiated-gradient descent on the log loss of ``w @ probs`` over the simplex (probs clipped
    inside (0, 1), so the mixture is too)."""
    weights = np.full(len(probs), 1.0 / len(probs))
    for _ in range(steps):
        mixed = weights @ probs
        gradient = probs @ ((1 - y) / (1 - mixed) - y / mixed) / len(y)
        weights = weights * np.exp(-np.clip(gradient, -50, 50))
        weights /= weights.sum()
    return weights
