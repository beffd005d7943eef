"""The flow-matching training objective and the learning-rate schedule.

Training sigmas (REFERENCE.md, "Training"): 1000 values `linspace(1, 0, 1001)[:-1]`, exponentially time-shifted with
a fixed mu = 0.8, then stretched so the last equals 0.02. Each sample draws a uniform index into that grid; its
noisy input is `x_t = (1 - sigma) x0 + sigma noise`, the target is `noise - x0`, and its MSE is weighted by
`w = exp(-2 ((1000 sigma - 500) / 1000)^2)`, minus the grid's minimum, normalized to mean 1 over the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from imagezoo.errors import InputError

TRAIN_TIMESTEPS = 1000
TRAIN_MU = 0.8
TRAIN_SHIFT_TERMINAL = 0.02


def training_sigmas(
    num: int = TRAIN_TIMESTEPS, mu: float = TRAIN_MU, shift_terminal: float | None = TRAIN_SHIFT_TERMINAL
) -> torch.Tensor:
    """The float64 training sigma grid, high to low."""
    sigmas = torch.linspace(1.0, 0.0, num + 1, dtype=torch.float64)[:-1]
    sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    if shift_terminal is not None:
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus * ((1.0 - shift_terminal) / one_minus[-1])
    return sigmas


def training_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """Per-grid-point loss weights: a Gaussian bump around sigma = 0.5, shifted to 0 at its minimum, mean 1."""
    t = sigmas * TRAIN_TIMESTEPS
    y = torch.exp(-2.0 * ((t - TRAIN_TIMESTEPS / 2) / TRAIN_TIMESTEPS) ** 2)
    y = y - y.min()
    return y * (len(sigmas) / y.sum())


@dataclass
class FlowMatchObjective:
    """Noising, target and weighting of the flow-matching loss on a fixed sigma grid."""

    sigmas: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def default(cls) -> FlowMatchObjective:
        """DiffSynth's Qwen-Image recipe (REFERENCE.md)."""
        sigmas = training_sigmas()
        return cls(sigmas=sigmas.float(), weights=training_weights(sigmas).float())

    def draw(self, generator: torch.Generator) -> int:
        """A uniform timestep index into the grid."""
        return int(torch.randint(0, len(self.sigmas), (1,), generator=generator))

    def noisy(self, clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """`(1 - sigma) x0 + sigma noise`, sigma per sample (B,)."""
        s = sigma.view(-1, *([1] * (clean.ndim - 1))).to(clean.dtype)
        return (1.0 - s) * clean + s * noise

    def loss(
        self, prediction: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample weighted MSE (B,) in float32, target `noise - x0`."""
        target = (noise - clean).float()
        mse = (prediction.float() - target).pow(2).flatten(1).mean(1)
        return mse * self.weights.to(mse.device)[indices.to(mse.device)]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator private to one sample of one epoch.

    Noise and timestep come from it, not from a process-wide RNG, so they depend only on (seed, epoch, sample):
    the same with one process or many, with any batch size or accumulation, and after a resume.
    """
    key = ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if kind not in ("constant", "linear", "cosine"):
        raise InputError(f"lr_scheduler={kind!r} is not allowed; use constant, linear or cosine.")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
