"""Linear probe: multinomial logistic regression on frozen features, in plain torch.

Follows the CLIP paper's protocol: sweep the L2 strength on a held-out validation split of the
training features, refit on all training features with the best value, report test accuracy.
Full-batch L-BFGS on standardised features: the problem is convex and small (N x D floats), so a
second-order method converges in tens of iterations with no learning rate to tune, and the result
does not depend on batch order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.eval.zero_shot import accuracy_metrics

log = logging.getLogger(__name__)

DEFAULT_L2 = tuple(10.0**e for e in range(-6, 3))  # 1e-6 ... 1e2


@dataclass
class LogisticRegression:
    """A fitted probe: standardisation statistics plus weights, so it can score raw features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.weight) - self.mean) / self.std
        return x @ self.weight + self.bias


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 100,
    init: LogisticRegression | None = None,
    device: torch.device | str | None = None,
) -> LogisticRegression:
    """Minimise ``mean cross-entropy + l2/2 * ||W||^2`` (bias not penalised)."""
    device = torch.device(device) if device is not None else features.device
    # float64 on CPU (cheap, and L-BFGS line searches like the precision); float32 on accelerators
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x = features.to(device, dtype)
    y = torch.as_tensor(labels, device=device, dtype=torch.long)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / std
    if init is not None:
        w = init.weight.detach().to(device, dtype).clone().requires_grad_(True)
        b = init.bias.detach().to(device, dtype).clone().requires_grad_(True)
    else:
        w = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(mean, std, w.detach(), b.detach(), l2)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    l2_values: Sequence[float] = DEFAULT_L2,
    val_fraction: float = 0.2,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Sweep ``l2_values`` on a validation split, refit on all training data, score the test set.

    Returns CLIP_benchmark's classification metrics (acc1, acc5, mean_per_class_recall) plus the
    chosen ``weight_decay`` (the L2 strength) and the validation accuracy of every candidate.
    """
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if len(train_labels) < 2:
        raise ValueError("linear probe needs at least 2 training samples")
    tr, va = split_train_val(len(train_labels), val_fraction, seed)
    sweep: dict[str, float] = {}
    best_l2, best_acc, model = None, -1.0, None
    # strongest regularisation first: each fit warm-starts from the previous, smoother solution
    for l2 in sorted(l2_values, reverse=True):
        model = fit_logistic_regression(
            train_features[tr],
            train_labels[tr],
            num_classes,
            l2,
            max_iter=max_iter,
            init=model,
            device=device,
        )
        pred = model.logits(train_features[va].to(model.weight.device)).argmax(1).cpu()
        acc = int((pred == train_labels[va]).sum()) / len(va)
        sweep[f"{l2:g}"] = acc
        log.debug("linear probe: l2=%g val acc=%.4f", l2, acc)
        if acc > best_acc + 1e-12:  # ties keep the stronger regularisation seen first
            best_l2, best_acc = l2, acc
    assert best_l2 is not None
    final = fit_logistic_regression(
        train_features, train_labels, num_classes, best_l2, max_iter=max_iter, device=device
    )
    logits = final.logits(test_features.to(final.weight.device)).float().cpu()
    metrics = accuracy_metrics(logits, test_labels, num_classes)
    metrics["weight_decay"] = best_l2
    metrics["val_acc1"] = best_acc
    metrics["l2_sweep"] = sweep
    if not math.isfinite(float(logits.sum())):
        log.warning("linear probe produced non-finite logits")
    return metrics
