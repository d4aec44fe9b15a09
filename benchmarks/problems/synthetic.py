"""Two regression tasks with a controlled task correlation: the synthetic data of MMoE (Ma et al., KDD 2018).

Generation (Section 4.1 of "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts"), re-implemented from the paper's description:

1. two orthogonal unit vectors u1, u2 ∈ R^d (Gram-Schmidt on Gaussian vectors);
2. with a scale c and the correlation ρ:  w1 = c·u1,  w2 = c·(ρ·u1 + sqrt(1 − ρ²)·u2), so cos(w1, w2) = ρ;
3. inputs x ~ N(0, I_d);
4. y_i = w_iᵀx + Σ_{k=1..m} sin(α_k·w_iᵀx + β_k) + ε_i,  ε_i ~ N(0, noise_std²).

The paper uses d = 100, c = 1, m = 10 and calls α_k, β_k "given parameters"; here they are drawn once per
seed, α_k, β_k ~ N(0, 1) (the sines are shared by both tasks, as in the paper, so ρ alone sets how related
the two tasks are).  ``noise_std = 0.1`` is the paper's N(0, 0.01).

What it measures: how the benefit of sharing (per-task test MSE, ``task1_mse`` / ``task2_mse``, lower is
better) depends on task relatedness; ρ ∈ {0, 0.5, 0.9} are the paper's settings (option ``rho``).  The model
is the paper's shared-bottom baseline: an MLP trunk, then one small MLP tower per task.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import MultiHeadModel, Problem, iterate_minibatches, numpy_rng
from .metrics import mse

__all__ = ["SyntheticProblem", "generate", "make"]


def generate(
    rng: np.random.Generator,
    n: int,
    d: int,
    rho: float,
    c: float = 1.0,
    m: int = 10,
    noise_std: float = 0.1,
    params: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(x (n, d), y (n, 2), params)``; pass the returned ``params`` back in to draw more samples (a test
    set) from the same task pair."""
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [-1, 1], got {rho}")
    if params is None:
        g = rng.standard_normal((d, 2))
        u1 = g[:, 0] / np.linalg.norm(g[:, 0])
        v = g[:, 1] - (g[:, 1] @ u1) * u1
        u2 = v / np.linalg.norm(v)
        w1 = c * u1
        w2 = c * (rho * u1 + np.sqrt(1.0 - rho**2) * u2)
        params = {
            "w": np.stack([w1, w2], axis=1),  # (d, 2)
            "alpha": rng.standard_normal(m),
            "beta": rng.standard_normal(m),
        }
    x = rng.standard_normal((n, d))
    lin = x @ params["w"]  # (n, 2)
    y = lin + np.sin(lin[:, :, None] * params["alpha"] + params["beta"]).sum(-1)
    y = y + noise_std * rng.standard_normal((n, 2))
    return x, y, params


class SyntheticProblem(Problem):
    name = "synthetic"
    task_names = ("task1", "task2")
    metric_names = ("task1_mse", "task2_mse")
    higher_is_better = {"task1_mse": False, "task2_mse": False}

    def __init__(
        self,
        seed,
        rho=0.5,
        n_train=2048,
        n_test=2048,
        dim=100,
        num_sines=10,
        noise_std=0.1,
        hidden=64,
        tower=16,
    ):
        super().__init__(seed)
        self.rho = float(rho)
        self.dim = int(dim)
        self.hidden = int(hidden)
        self.tower = int(tower)
        rng = numpy_rng(seed, 1)
        x, y, self.params = generate(rng, n_train, dim, self.rho, m=num_sines, noise_std=noise_std)
        xt, yt, _ = generate(rng, n_test, dim, self.rho, m=num_sines, noise_std=noise_std, params=self.params)
        self.x_train = torch.from_numpy(x).float()
        self.y_train = torch.from_numpy(y).float()
        self.x_test = torch.from_numpy(xt).float()
        self.y_test = torch.from_numpy(yt).float()

    def _build_model(self) -> nn.Module:
        trunk = nn.Sequential(
            nn.Linear(self.dim, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
        )
        heads = [
            nn.Sequential(nn.Linear(self.hidden, self.tower), nn.ReLU(), nn.Linear(self.tower, 1))
            for _ in range(2)
        ]
        return MultiHeadModel(trunk, heads)

    def train_batches(self, batch_size: int = 128, generator=None, num_steps: int | None = None):
        """``x`` (B, dim) float32, targets ``(y1 (B,), y2 (B,))``."""
        y = self.y_train
        return iterate_minibatches(self.x_train, (y[:, 0], y[:, 1]), len(y), batch_size, generator, num_steps)

    def losses(self, outputs, targets) -> list[torch.Tensor]:
        return [F.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True)]

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        out = model(self.x_test)
        return {"task1_mse": mse(out[0], self.y_test[:, 0]), "task2_mse": mse(out[1], self.y_test[:, 1])}

    def label_correlation(self) -> float:
        """Pearson correlation of the two training targets (falls below ρ because of the sines)."""
        return float(np.corrcoef(self.y_train[:, 0].numpy(), self.y_train[:, 1].numpy())[0, 1])


def make(
    seed: int = 0,
    rho: float = 0.5,
    n_train: int = 2048,
    n_test: int = 2048,
    dim: int = 100,
    num_sines: int = 10,
    noise_std: float = 0.1,
    hidden: int = 64,
    tower: int = 16,
) -> SyntheticProblem:
    """MMoE synthetic regression pair, weight-vector cosine ``rho``; metrics ``task1_mse``, ``task2_mse``."""
    return SyntheticProblem(
        seed,
        rho=rho,
        n_train=n_train,
        n_test=n_test,
        dim=dim,
        num_sines=num_sines,
        noise_std=noise_std,
        hidden=hidden,
        tower=tower,
    )
