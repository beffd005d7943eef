"""Sigma schedules against diffusers' FlowMatchEulerDiscreteScheduler with the published Qwen-Image config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from imagezoo.errors import InputError
from imagezoo.plugin_manager import Kernel
from imagezoo.plugins.samplers.flow_match import FlowMatchEuler, resolution_mu

# scheduler/scheduler_config.json of Qwen/Qwen-Image (REFERENCE.md "Configs")
QWEN_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=math.log(3),  # unused with dynamic shifting and an explicit mu
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=math.log(3),
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
TOLERANCE = 1e-5  # float32 schedule computed in float64 here vs float32 numpy in diffusers


def _official_mu(seq_len: int) -> float:
    # diffusers' pipeline calculate_shift with the defaults the Qwen pipeline passes (0.5 .. 0.9 over 256 .. 8192)
    m = (0.9 - 0.5) / (8192 - 256)
    return seq_len * m + (0.5 - m * 256)


@pytest.mark.parametrize(("steps", "size"), [(4, 1024), (50, 1328), (30, 512), (2, 256)])
def test_official_schedule_matches_diffusers(steps, size):
    seq_len = (size // 16) ** 2
    reference = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_official_mu(seq_len))
    ours = FlowMatchEuler().sigmas(steps, seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.max(torch.abs(ours - reference.sigmas)).item() <= TOLERANCE


def test_mu_reference_values_and_terminal():
    assert resolution_mu((1328 // 16) ** 2) == pytest.approx(0.834, abs=1e-3)
    assert resolution_mu((1024 // 16) ** 2) == pytest.approx(0.693, abs=1e-3)
    sigmas = FlowMatchEuler().sigmas(20, 4096)
    assert sigmas[0].item() == pytest.approx(1.0)
    assert sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_single_step_is_one_to_zero():
    # diffusers' stretch divides by zero here (NaN); one step from pure noise is simply [1, 0]
    assert FlowMatchEuler().sigmas(1, 4096).tolist() == [1.0, 0.0]


def test_img2img_official_truncates_like_diffusers():
    steps, seq, strength = 10, 4096, 0.55
    full = FlowMatchEuler().sigmas(steps, seq)
    part = FlowMatchEuler().sigmas(steps, seq, strength)
    skipped = int(max(steps - min(steps * strength, steps), 0))  # diffusers' QwenImageImg2ImgPipeline.get_timesteps
    assert skipped == 4 and torch.equal(part, full[skipped:])


def test_diffsynth_equals_official_for_txt2img_and_spreads_steps_for_img2img():
    kernel = Kernel(load=[])
    diffsynth = kernel.samplers.get("flow_match_euler_diffsynth").value()
    official = kernel.samplers.get("flow_match_euler").value()
    steps, seq = 10, 4096
    # linspace(1, 0, N+1)[:-1] and linspace(1, 1/N, N) are the same points
    assert torch.allclose(diffsynth.sigmas(steps, seq), official.sigmas(steps, seq), atol=1e-7)
    part = diffsynth.sigmas(steps, seq, 0.5)
    assert part.shape == (steps + 1,)  # all N steps run below the start
    mu = resolution_mu(seq)
    raw = FlowMatchEuler(start="diffsynth", shift_terminal=None).sigmas(steps, seq, 0.5)
    assert raw[0].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.5 - 1), rel=1e-6)
    assert part[-2].item() == pytest.approx(0.02, abs=1e-6)


def test_lightning_preset_uses_ln3_without_stretch():
    lightning = Kernel(load=[]).samplers.get("flow_match_euler_lightning").value()
    for seq_len in (1024, 6889):
        sig = lightning.sigmas(8, seq_len)
        base = torch.linspace(1, 1 / 8, 8, dtype=torch.float64)
        expected = 3.0 / (3.0 + 1 / base - 1)
        assert torch.allclose(sig[:-1].double(), expected, atol=1e-6)


def test_euler_step_and_bad_inputs():
    x, v = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0)
    out = FlowMatchEuler().step(x.half(), v.half(), 0.5, 0.25)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(x, 0.5))
    with pytest.raises(InputError, match="num_inference_steps=0"):
        FlowMatchEuler().sigmas(0, 100)
    with pytest.raises(InputError, match=r"denoising_strength=1.5"):
        FlowMatchEuler().sigmas(4, 100, 1.5)
    assert len(FlowMatchEuler().sigmas(4, 100, 0.1)) == 2  # as diffusers: at least one step runs
    with pytest.raises(InputError, match="'sideways'"):
        FlowMatchEuler(start="sideways")
