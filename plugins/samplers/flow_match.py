"""Flow-matching sigma schedules and the Euler step, as small functions.

The official Qwen-Image schedule (diffusers' FlowMatchEulerDiscreteScheduler with the published scheduler config)
is `sigma = linspace(1, 1/N, N)`, shifted by an exponential time shift whose mu grows with the image's token count,
then stretched so the last sigma equals `shift_terminal`, then 0 appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imagezoo.errors import InputError

START_OFFICIAL = "official"
START_DIFFSYNTH = "diffsynth"
STARTS = (START_OFFICIAL, START_DIFFSYNTH)


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
) -> float:
    """Linear interpolation of the time-shift mu in the image's token count (0.834 at 1328², 0.693 at 1024²)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Exponential time shift `e^mu / (e^mu + 1/sigma - 1)`; sigma = 1 maps to 1."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Affinely stretch `1 - sigma` so the last sigma becomes `terminal`."""
    one_minus = 1.0 - sigmas
    return 1.0 - one_minus * ((1.0 - terminal) / one_minus[-1])


def base_sigmas(num_steps: int, start: str = START_OFFICIAL, strength: float = 1.0) -> torch.Tensor:
    """Unshifted sigmas to run (float64).

    Official: `linspace(1, 1/N, N)`, image-to-image keeps its last `N·strength` (diffusers' rounding).
    DiffSynth: `linspace(strength, 0, N+1)[:-1]`: for text-to-image the same values, for image-to-image N steps
    spread below `strength`.
    """
    if start == START_OFFICIAL:
        full = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        skipped = int(max(num_steps - min(num_steps * strength, num_steps), 0))
        return full[skipped:]
    if start == START_DIFFSYNTH:
        return torch.linspace(strength, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    raise InputError(f"Unknown sigma start {start!r}; allowed: {', '.join(STARTS)}.")


@dataclass(frozen=True)
class FlowMatchEuler:
    """Euler sampler for flow-matching models with a shifted sigma schedule.

    Args:
        start: `"official"` (diffusers / Qwen) or `"diffsynth"` base spacing.
        shift_terminal: Last non-zero sigma after stretching; None disables the stretch.
        fixed_mu: Use this mu at every resolution (few-step "lightning" LoRAs use ln 3) instead of the
            resolution-dependent one.
        base_seq_len, max_seq_len, base_shift, max_shift: Resolution-dependent mu interpolation.
    """

    start: str = START_OFFICIAL
    shift_terminal: float | None = 0.02
    fixed_mu: float | None = None
    base_seq_len: int = 256
    max_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise InputError(f"FlowMatchEuler start={self.start!r} is not allowed; use one of {', '.join(STARTS)}.")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise InputError(f"shift_terminal={self.shift_terminal!r} must be in [0, 1) or None.")

    def mu(self, image_seq_len: int) -> float:
        """The time-shift mu used for an image of `image_seq_len` tokens."""
        if self.fixed_mu is not None:
            return self.fixed_mu
        return resolution_mu(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def sigmas(self, num_steps: int, image_seq_len: int, strength: float = 1.0) -> torch.Tensor:
        """Return the float32 sigmas to run, decreasing and ending in 0 (fewer than N + 1 for image-to-image).

        Args:
            num_steps: Number of inference steps N.
            image_seq_len: Image tokens, (H/16)·(W/16), for the resolution-dependent shift.
            strength: Image-to-image denoising strength in (0, 1]; 1 for text-to-image.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise InputError(f"num_inference_steps={num_steps!r} must be a positive integer.")
        if not 0.0 < strength <= 1.0:
            raise InputError(f"denoising_strength={strength!r} must be in (0, 1].")
        full_length = len(base_sigmas(num_steps, self.start))
        sigmas = base_sigmas(num_steps, self.start, strength)
        if self.start == START_OFFICIAL and len(sigmas) < full_length:
            # The official schedule is shifted and stretched as a whole, then truncated.
            return self.sigmas(num_steps, image_seq_len)[full_length - len(sigmas) :]
        sigmas = time_shift(self.mu(image_seq_len), sigmas)
        # A one-step schedule is just [1]: nothing to stretch (the stretch would divide by zero).
        if self.shift_terminal is not None and sigmas[-1] < 1.0:
            sigmas = stretch_to_terminal(sigmas, self.shift_terminal)
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)

    def step(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """One Euler step in float32: `x + (sigma_next - sigma) * v`."""
        return latents.float() + (sigma_next - sigma) * velocity.float()
