"""LocalClassifier: what its readout sees, whatever pooling path the feature map takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_tlbptt import LocalClassifier

from snn_fixtures import lif

ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


@pytest.mark.parametrize(
    "spatial",
    [(8, 8), (12, 8), (10, 10), (16,), (8, 8, 8), (4, 4), (2, 9)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_readout_sees_the_adaptive_average_of_each_window(spatial):
    # Maps whose sides are multiples of the pool size take avg_pool (faster), the others adaptive pooling;
    # both must give the readout the average of the same windows, and pass the same gradient back.
    pool = 4 if len(spatial) < 3 else 2
    x = torch.rand(3, 2, 5, *spatial, requires_grad=True)
    classifier = LocalClassifier(7, lif(), pool=pool)
    seen = []
    classifier.linear.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    classifier(x)
    flat = x.flatten(0, 1)
    expected = ADAPTIVE[len(spatial)](flat, pool) if any(s > pool for s in spatial) else flat
    torch.testing.assert_close(seen[0], expected.flatten(1))

    weights = torch.randn_like(seen[0])
    (grad,) = torch.autograd.grad((seen[0] * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected.flatten(1) * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)
