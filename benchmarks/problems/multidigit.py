"""MultiMNIST-style two-digit classification built from scikit-learn's shipped 8×8 digits.

MultiMNIST (Sabour et al., 2017) as used for multi-task learning by Sener & Koltun (NeurIPS 2018, "Multi-Task
Learning as Multi-Objective Optimization") and Lin et al. (NeurIPS 2019, Pareto MTL): two digits overlaid on
one canvas, one toward the top-left and one toward the bottom-right, and two tasks: classify the left digit,
classify the right digit.  Both tasks read the same pixels, so they compete for a small shared trunk.

Here, offline and small: the 1797 8×8 images of ``sklearn.datasets.load_digits`` (shipped with
scikit-learn, never downloaded) are split per seed into disjoint train/test image pools (``test_fraction``);
each sample draws two images from its pool and pastes them on a ``canvas``×``canvas`` image (default 14):
the left digit at a random offset in [0, max_shift]² and the right digit at a random offset in
[canvas − 8 − max_shift, canvas − 8]², combined by a pixel-wise max, scaled to [0, 1].

Metrics: ``left_acc`` and ``right_acc`` (test accuracy; higher is better).  :func:`delta_m` (Δm% of
Maninis et al. 2019, from :mod:`.metrics`) compares them with single-task baselines; negative is better.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import MultiHeadModel, Problem, iterate_minibatches, numpy_rng
from .metrics import accuracy, delta_m

__all__ = ["MultiDigitProblem", "delta_m", "load_digit_images", "make", "overlay"]


@functools.lru_cache(maxsize=1)
def _load_digits_cached() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is a benchmark-only dependency

    d = load_digits()
    images, labels = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)``: scikit-learn's shipped digits
    (``sklearn.datasets.load_digits``, read from the installed package, cached after the first call)."""
    images, labels = _load_digits_cached()
    return images.copy(), labels.copy()


def overlay(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    canvas: int = 14,
    max_shift: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` composites ``(x (n, canvas, canvas), left_label (n,), right_label (n,))`` from an image pool."""
    lo_right = canvas - 8 - max_shift
    if max_shift < 0 or lo_right < 0:
        raise ValueError(f"canvas={canvas} too small for 8x8 digits with max_shift={max_shift}")
    if lo_right <= max_shift:
        raise ValueError("the left and right position ranges overlap; enlarge canvas or reduce max_shift")
    i_left = rng.integers(0, len(images), n)
    i_right = rng.integers(0, len(images), n)
    off_left = rng.integers(0, max_shift + 1, (n, 2))
    off_right = rng.integers(lo_right, canvas - 8 + 1, (n, 2))
    x = np.zeros((n, canvas, canvas), dtype=np.float32)
    rows = np.arange(8)
    for idx, off in ((i_left, off_left), (i_right, off_right)):
        r = off[:, 0:1, None] + rows[None, :, None]  # (n, 8, 1)
        c = off[:, 1:2, None] + rows[None, None, :]  # (n, 1, 8)
        k = np.arange(n)[:, None, None]
        x[k, r, c] = np.maximum(x[k, r, c], images[idx])
    return x, labels[i_left], labels[i_right]


class MultiDigitProblem(Problem):
    name = "multidigit"
    task_names = ("left", "right")
    metric_names = ("left_acc", "right_acc")
    higher_is_better = {"left_acc": True, "right_acc": True}

    def __init__(
        self,
        seed,
        n_train=4096,
        n_test=1024,
        canvas=14,
        max_shift=2,
        test_fraction=0.3,
        trunk="conv",
        width=8,
    ):
        super().__init__(seed)
        if trunk not in ("conv", "mlp"):
            raise ValueError(f"trunk must be 'conv' or 'mlp', got {trunk!r}")
        self.canvas = int(canvas)
        self.trunk = trunk
        self.width = int(width)
        images, labels = load_digit_images()
        perm = numpy_rng(seed, 1).permutation(len(images))
        n_test_pool = int(round(test_fraction * len(images)))
        test_pool, train_pool = perm[:n_test_pool], perm[n_test_pool:]
        self.train_pool, self.test_pool = np.sort(train_pool), np.sort(test_pool)
        rng = numpy_rng(seed, 2)
        x, yl, yr = overlay(rng, images[train_pool], labels[train_pool], int(n_train), self.canvas, max_shift)
        xt, ylt, yrt = overlay(rng, images[test_pool], labels[test_pool], int(n_test), self.canvas, max_shift)
        self.x_train = torch.from_numpy(x).unsqueeze(1)
        self.y_train = torch.from_numpy(np.stack([yl, yr], axis=1))
        self.x_test = torch.from_numpy(xt).unsqueeze(1)
        self.y_test = torch.from_numpy(np.stack([ylt, yrt], axis=1))

    def _build_model(self) -> nn.Module:
        w, c = self.width, self.canvas
        if self.trunk == "conv":
            side = c // 2 // 2
            trunk = nn.Sequential(
                nn.Conv2d(1, w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2 * w * side * side, 64),
                nn.ReLU(),
            )
        else:
            trunk = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * c, 8 * w),
                nn.ReLU(),
                nn.Linear(8 * w, 64),
                nn.ReLU(),
            )
        return MultiHeadModel(trunk, [nn.Linear(64, 10), nn.Linear(64, 10)])

    def train_batches(self, batch_size: int = 128, generator=None, num_steps: int | None = None):
        """``x`` (B, 1, canvas, canvas) float32, targets ``(left (B,), right (B,))`` int64."""
        y = self.y_train
        return iterate_minibatches(self.x_train, (y[:, 0], y[:, 1]), len(y), batch_size, generator, num_steps)

    def losses(self, outputs, targets) -> list[torch.Tensor]:
        return [F.cross_entropy(o, t) for o, t in zip(outputs, targets, strict=True)]

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        left, right = model(self.x_test)
        return {
            "left_acc": accuracy(left, self.y_test[:, 0]),
            "right_acc": accuracy(right, self.y_test[:, 1]),
        }


def make(
    seed: int = 0,
    n_train: int = 4096,
    n_test: int = 1024,
    canvas: int = 14,
    max_shift: int = 2,
    test_fraction: float = 0.3,
    trunk: str = "conv",
    width: int = 8,
) -> MultiDigitProblem:
    """Two overlaid digits, two 10-way heads; metrics ``left_acc``, ``right_acc``.

    ``trunk="conv"``: conv(width)-pool-conv(2·width)-pool-linear(64), deliberately small so that the two
    tasks compete for it; ``trunk="mlp"``: a two-layer MLP (faster, weaker).
    """
    return MultiDigitProblem(
        seed,
        n_train=n_train,
        n_test=n_test,
        canvas=canvas,
        max_shift=max_shift,
        test_fraction=test_fraction,
        trunk=trunk,
        width=width,
    )
