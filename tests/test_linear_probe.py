"""Linear probe: accuracy on separable data and a sensible choice of L2 strength."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.eval.linear_probe import fit_logistic_regression, linear_probe


def _gaussian_classes(n: int, dim: int, num_classes: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return centers[labels] + spread * torch.randn(n, dim, generator=gen), labels


@pytest.mark.slow
def test_separable_features_reach_high_accuracy():
    xtr, ytr = _gaussian_classes(400, 16, 5, 1.0, seed=0)
    xte, yte = _gaussian_classes(200, 16, 5, 1.0, seed=1)
    m = linear_probe(xtr, ytr, xte, yte, l2_values=(1e-3, 1e-1, 10.0))
    assert m["acc1"] >= 0.97
    assert m["acc5"] == 1.0
    assert m["mean_per_class_recall"] >= 0.95
    assert m["weight_decay"] in [float(k) for k in m["l2_sweep"]]
    assert m["val_acc1"] == max(m["l2_sweep"].values())


def test_fit_minimises_the_regularised_objective():
    xtr, ytr = _gaussian_classes(120, 6, 3, 2.0, seed=2)
    probe = fit_logistic_regression(xtr, ytr, 3, l2=0.1)
    w = probe.weight.clone().requires_grad_(True)
    b = probe.bias.clone().requires_grad_(True)
    x = (xtr.double() - probe.mean) / probe.std
    loss = F.cross_entropy(x @ w + b, ytr) + 0.05 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5  # at the optimum


def test_sweep_picks_the_best_validated_strength_and_avoids_collapse():
    # a penalty that is far too strong shrinks W to ~0 and predicts the majority class; the sweep
    # must see that on the validation split and pick a weaker value
    xtr, ytr = _gaussian_classes(300, 40, 4, 2.5, seed=3)
    xte, yte = _gaussian_classes(300, 40, 4, 2.5, seed=4)
    m = linear_probe(xtr, ytr, xte, yte, l2_values=(1e-4, 1e-2, 1.0, 100.0), val_fraction=0.3)
    assert m["l2_sweep"]["100"] < 0.5
    assert m["weight_decay"] < 100
    assert m["val_acc1"] == max(m["l2_sweep"].values())
    # among equally good values the strongest (simplest) one wins
    best = [float(k) for k, v in m["l2_sweep"].items() if v == m["val_acc1"]]
    assert m["weight_decay"] == max(best)
    assert m["acc1"] > 0.9


def test_rejects_tiny_training_set():
    with pytest.raises(ValueError):
        linear_probe(torch.randn(1, 3), torch.tensor([0]), torch.randn(2, 3), torch.tensor([0, 1]))
