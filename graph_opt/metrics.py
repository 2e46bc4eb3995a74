"""Fidelity metrics between a reference (teacher) output and a candidate (student) output.

All functions take numpy arrays and compute in float64. Conventions:
- `rel_error` is the relative L2 error ‖s − t‖₂ / ‖t‖₂;
- `snr_db` is 10·log10(‖t‖² / ‖s − t‖²) (inf when identical);
- `top1_agreement`: share of samples whose arg-max class is the same;
  `top5_agreement`: share whose teacher top-1 class is among the student's 5 best;
- `kd_loss`: soft-label distillation loss α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y),
  averaged over samples (the CE term only when labels are given);
- `feature_distance`: ½‖A_s − A_t‖_F² divided by the number of elements (attention/feature maps);
- `relation_distance`: mean squared difference of the sample-by-sample cosine-similarity (Gram)
  matrices of teacher and student features on one batch, ‖G_s − G_t‖_F² / n².
"""

from __future__ import annotations

import numpy as np


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def max_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    d = _flat(ref) - _flat(cand)
    return float(np.max(np.abs(d))) if d.size else 0.0


def rel_error(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = _flat(ref), _flat(cand)
    denom = np.linalg.norm(r)
    num = np.linalg.norm(r - c)
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = _flat(ref), _flat(cand)
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr == 0 and nc == 0:
        return 1.0
    if nr == 0 or nc == 0:
        return 0.0
    return float(np.dot(r, c) / (nr * nc))


def snr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = _flat(ref), _flat(cand)
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def _logits2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = _logits2d(ref), _logits2d(cand)
    return float(np.mean(np.argmax(r, 1) == np.argmax(c, 1)))


def topk_agreement(ref: np.ndarray, cand: np.ndarray, k: int = 5) -> float:
    r, c = _logits2d(ref), _logits2d(cand)
    k = min(k, c.shape[1])
    best = np.argpartition(-c, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(best == np.argmax(r, 1)[:, None], axis=1)))


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def kd_loss(teacher: np.ndarray, student: np.ndarray, *, temperature: float = 1.0, alpha: float = 1.0,
            labels: np.ndarray | None = None) -> float:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y), mean over samples."""
    t, s = _logits2d(teacher), _logits2d(student)
    log_pt = log_softmax(t / temperature)
    log_ps = log_softmax(s / temperature)
    kl = np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=1)
    loss = alpha * temperature ** 2 * float(np.mean(kl))
    if labels is not None and alpha < 1.0:
        ce = -log_softmax(s)[np.arange(len(s)), np.asarray(labels, dtype=np.int64)]
        loss += (1.0 - alpha) * float(np.mean(ce))
    return loss


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(_logits2d(logits), 1) == np.asarray(labels).ravel()))


def feature_distance(teacher: np.ndarray, student: np.ndarray) -> float:
    """½‖A_s − A_t‖_F², normalized per element."""
    t, s = _flat(teacher), _flat(student)
    return float(0.5 * np.sum((s - t) ** 2) / max(t.size, 1))


def gram(features: np.ndarray) -> np.ndarray:
    """Cosine-similarity matrix between the samples (rows) of a batch of features."""
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.where(norms == 0, 1.0, norms)
    return f @ f.T


def relation_distance(teacher: np.ndarray, student: np.ndarray) -> float:
    """‖G_s − G_t‖_F² / n² between the sample-similarity matrices of one batch."""
    gt, gs = gram(teacher), gram(student)
    return float(np.sum((gs - gt) ** 2) / max(gt.size, 1))
