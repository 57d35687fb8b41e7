"""Calibrated probabilities: temperature scaling and ensemble weights, both fitted on validation log loss.

Pure math on tensors and arrays (the bottom layer: no catdog imports).  Training fits a model's
temperature from sums it accumulates during its validation pass (:func:`log_loss_sums`, summed over
batches and ranks, then :func:`pick_temperature`); the validation study fits ensemble weights from
the members' calibrated probabilities (:func:`greedy_ensemble_weights`).
"""

from __future__ import annotations

import numpy as np
import torch

CLIP = (0.005, 0.995)  # Kaggle Redux: one confident mistake must not explode log loss
# Log-spaced temperatures from 1/4 to 16 in steps of 2**0.05 (~3.5%); 1.0 is on the grid (index 40).
# Up to 16: a model stopped after an epoch or two is often far over-confident (4 was the edge).
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 121))
ENSEMBLE_ROUNDS = 25


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


def greedy_ensemble_weights(member_probs: np.ndarray, labels: np.ndarray, rounds: int = ENSEMBLE_ROUNDS) -> np.ndarray:
    """Ensemble selection with replacement (Caruana et al., 2004) on log loss.

    ``member_probs``: (members, images) calibrated p(dog).  Start from the best single member, then
    add, one at a time and with replacement, the member whose addition lowers the log loss of the
    averaged probabilities the most; stop when no addition lowers it, or after ``rounds``.  The
    weights are the counts over their total, so on this data the ensemble is never worse than its
    best member (a member that never helps gets weight 0)."""
    probs = np.asarray(member_probs, dtype=np.float64)
    counts = np.zeros(len(probs), dtype=np.int64)
    first = int(np.argmin([clipped_log_loss(p, labels) for p in probs]))
    counts[first], total, loss = 1, probs[first].copy(), clipped_log_loss(probs[first], labels)
    for _ in range(rounds):
        n = counts.sum()
        candidates = [clipped_log_loss((total + p) / (n + 1), labels) for p in probs]
        pick = int(np.argmin(candidates))
        if candidates[pick] >= loss:
            break
        counts[pick] += 1
        total += probs[pick]
        loss = candidates[pick]
    return counts / counts.sum()
