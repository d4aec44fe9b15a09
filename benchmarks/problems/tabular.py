"""Small-data classification for the regularisation (main loss + L2) and noisy-label (noisy loss + small
clean set) benchmarks.

Data: scikit-learn's shipped ``load_digits`` (1797 8×8 images as 64 features in [0, 1], 10 classes; never
downloaded).  Per seed, a fixed held-out test set (``n_test`` samples, default 597, a third of the data) is
split off; the training set is a small subset (``n_train``, default 300) of the remaining 1200 samples, so an
MLP from :func:`build_classifier` (default 2 × 256 hidden units, ≈ 85k parameters) over-fits it easily.
This is the classic over-parameterised setting of the auxiliary-loss literature: weight decay as an
auxiliary task, and learning from noisy labels with a small trusted set (e.g. Ren et al., ICML 2018,
"Learning to reweight examples"; Hendrycks et al., NeurIPS 2018, GLC).

Noisy-label variant (``noise_rate > 0`` and/or ``clean_fraction > 0``): :func:`split_clean` takes a small,
class-balanced clean subset (``clean_fraction`` of the ``n_train`` samples, e.g. 0.02-0.05) out of the
training set; the other samples get symmetric label noise from :func:`add_symmetric_noise` (a corrupted
label is uniform over the *other* classes; exactly ``round(noise_rate · n)`` labels are corrupted).  The clean
and noisy samples are disjoint.

The problem is single-task (``task_names == ("ce",)``: cross-entropy on the possibly noisy training labels);
the benchmarks add their second loss themselves (the parameters' L2 norm, or the cross-entropy on a batch
from :meth:`TabularProblem.clean_batches`).  Metrics: ``test_acc`` (higher is better), ``test_loss``
(cross-entropy, lower is better).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import MultiHeadModel, Problem, as_generator, iterate_minibatches, numpy_rng
from .metrics import accuracy
from .multidigit import load_digit_images

__all__ = ["TabularProblem", "add_symmetric_noise", "build_classifier", "load_dataset", "make", "split_clean"]

NUM_FEATURES = 64
NUM_CLASSES = 10


def load_dataset() -> tuple[np.ndarray, np.ndarray]:
    """``(x (1797, 64) float32 in [0, 1], y (1797,) int64)``: scikit-learn's shipped digits, flattened
    (copies of ``multidigit.load_digit_images``)."""
    images, labels = load_digit_images()
    return images.reshape(len(images), NUM_FEATURES), labels


def build_classifier(
    hidden: int = 256, depth: int = 2, in_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES
) -> nn.Sequential:
    """An MLP ``in_features → hidden (×depth, ReLU) → num_classes`` returning logits.

    With the defaults it has ≈ 85k parameters, far more than the 300-sample training subset needs.
    Uses the global torch RNG for its initialisation (``TabularProblem.build_model`` seeds it).
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def add_symmetric_noise(
    labels: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator | int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: ``(noisy_labels, flipped)`` with ``flipped`` a bool mask.

    Exactly ``round(rate · n)`` samples, chosen uniformly at random, get a label drawn uniformly from the
    ``num_classes − 1`` classes other than their own (so every flipped label really changes); the others keep
    theirs.  ``labels`` is not modified.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError("need at least two classes")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError("labels out of range [0, num_classes)")
    g = as_generator(generator)
    n = labels.numel()
    k = int(round(rate * n))
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[:k]] = True
    shift = torch.randint(1, num_classes, (k,), generator=g)  # 1 .. C-1: never the original class
    noisy = labels.clone().reshape(-1)
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy.reshape(labels.shape), flipped.reshape(labels.shape)


def split_clean(
    labels: torch.Tensor, fraction: float, generator: torch.Generator | int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into ``(clean_idx, rest_idx)``, disjoint, together ``0..n-1``.

    ``clean_idx`` has ``round(fraction · n)`` samples (at least 1 when ``fraction > 0``), class-balanced: it
    takes the first-drawn sample of every class, then the second, ... (random order inside each round), so
    that each class present is represented once the subset has at least as many samples as classes.
    ``rest_idx`` is sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.numel()
    k = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    g = as_generator(generator)
    perm = torch.randperm(n, generator=g)
    lab = labels[perm]
    # occurrence rank of each drawn sample inside its class
    rank = torch.zeros(n, dtype=torch.long)
    for c in torch.unique(lab):
        pos = (lab == c).nonzero().reshape(-1)
        rank[pos] = torch.arange(len(pos))
    tiebreak = torch.randperm(n, generator=g)
    order = torch.argsort(rank * n + tiebreak)
    clean = perm[order[:k]]
    mask = torch.ones(n, dtype=torch.bool)
    mask[clean] = False
    return clean, mask.nonzero().reshape(-1)


class TabularProblem(Problem):
    name = "tabular"
    task_names = ("ce",)
    metric_names = ("test_acc", "test_loss")
    higher_is_better = {"test_acc": True, "test_loss": False}

    def __init__(
        self, seed, n_train=300, n_test=597, noise_rate=0.0, clean_fraction=0.0, hidden=256, depth=2
    ):
        super().__init__(seed)
        x, y = load_dataset()
        if n_test < 1 or n_train < 1 or n_train + n_test > len(y):
            raise ValueError(f"need n_train + n_test <= {len(y)} and both >= 1")
        self.hidden, self.depth = int(hidden), int(depth)
        self.num_classes = NUM_CLASSES
        self.noise_rate = float(noise_rate)
        perm = numpy_rng(seed, 1).permutation(len(y))
        test_idx = perm[: int(n_test)]
        train_idx = perm[int(n_test) : int(n_test) + int(n_train)]
        self.x_test, self.y_test = torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx])
        x_tr, y_tr = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])

        g = torch.Generator()
        g.manual_seed(int(numpy_rng(seed, 2).integers(2**62)))
        clean, rest = split_clean(y_tr, clean_fraction, g)
        self.x_clean, self.y_clean = x_tr[clean], y_tr[clean]
        self.x_train, self.y_train_true = x_tr[rest], y_tr[rest]
        self.y_train, self.noise_mask = add_symmetric_noise(self.y_train_true, noise_rate, NUM_CLASSES, g)
        self.train_indices = torch.from_numpy(train_idx)[rest]  # rows of load_dataset()
        self.clean_indices = torch.from_numpy(train_idx)[clean]
        self.test_indices = torch.from_numpy(test_idx)

    def build_classifier(self) -> nn.Sequential:
        """Unseeded plain classifier (logits out) of this problem's size."""
        return build_classifier(self.hidden, self.depth)

    def _build_model(self) -> nn.Module:
        net = build_classifier(self.hidden, self.depth)
        return MultiHeadModel(net[:-1], [net[-1]])

    def train_batches(self, batch_size: int = 64, generator=None, num_steps: int | None = None):
        """``x`` (B, 64) float32, targets ``(labels (B,),)`` -- the possibly noisy labels."""
        return iterate_minibatches(
            self.x_train, (self.y_train,), len(self.y_train), batch_size, generator, num_steps
        )

    def clean_batches(self, batch_size: int = 64, generator=None, num_steps: int | None = None):
        """Minibatches ``(x, (labels,))`` of the clean subset (empty when ``clean_fraction == 0``)."""
        if len(self.y_clean) == 0:
            raise ValueError("this problem has no clean subset (clean_fraction=0)")
        return iterate_minibatches(
            self.x_clean, (self.y_clean,), len(self.y_clean), batch_size, generator, num_steps
        )

    def losses(self, outputs, targets) -> list[torch.Tensor]:
        return [F.cross_entropy(outputs[0], targets[0])]

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        (logits,) = model(self.x_test)
        return {
            "test_acc": accuracy(logits, self.y_test),
            "test_loss": float(F.cross_entropy(logits, self.y_test)),
        }


def make(
    seed: int = 0,
    n_train: int = 300,
    n_test: int = 597,
    noise_rate: float = 0.0,
    clean_fraction: float = 0.0,
    hidden: int = 256,
    depth: int = 2,
) -> TabularProblem:
    """Digits, ``n_train`` training samples (``clean_fraction`` of them set aside clean, the rest with
    ``noise_rate`` symmetric noise), ``n_test`` held out; metrics ``test_acc``, ``test_loss``."""
    return TabularProblem(
        seed,
        n_train=n_train,
        n_test=n_test,
        noise_rate=noise_rate,
        clean_fraction=clean_fraction,
        hidden=hidden,
        depth=depth,
    )
