"""fp8: scaled FP8 storage within a stated tolerance, compute-dtype forwards, exact removal, placement on top."""

from __future__ import annotations

import pytest
import torch

from imagezoo.errors import InputError
from imagezoo.plugins.memory.fp8 import SCALE, dequantize, quantize

# e4m3 keeps 3 mantissa bits: rounding moves a weight by at most 2^-4 of itself (half an ulp), 2^-5 on average.
WEIGHT_TOLERANCE = 2**-4
# Stated tolerance for final latents of the tiny model (2 steps, CFG 4) against the plain float32 run.
LATENT_TOLERANCE = 0.01


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_per_channel_scales_keep_every_row_within_fp8_precision():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    weight[:8] *= 1e-4  # rows far below FP8's smallest normal number (2^-6)
    q, scale = quantize(weight, torch.float8_e4m3fn, "channel")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = dequantize(q, scale, torch.float32)
    rows = ((back - weight).norm(dim=1) / weight.norm(dim=1)).max().item()
    assert rows < WEIGHT_TOLERANCE
    # A plain downcast flushes the small rows to (sub)normal garbage: what shows as grid artifacts with LoRAs.
    plain = weight.to(torch.float8_e4m3fn).float()
    assert ((plain[:8] - weight[:8]).norm(dim=1) / weight[:8].norm(dim=1)).min().item() > 0.1
    # One scale per tensor is coarser than per channel on such a weight.
    q_t, scale_t = quantize(weight, torch.float8_e4m3fn, "tensor")
    assert scale_t.shape == (1,)
    assert _relative(dequantize(q_t, scale_t, torch.float32)[:8], weight[:8]) > rows


def test_fp8_output_within_tolerance_and_weights_stored_in_fp8(clean, reference, generate):
    dit = clean.components.modules["dit"]
    seen = []
    clean.enable_memory(["fp8"])
    # Registered after fp8's own hook, so it sees what the layer computes with.
    handle = dit.transformer_blocks[0].attn.to_q.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.dtype)
    )
    try:
        latents = generate(clean)
    finally:
        handle.remove()
    assert 0 < _relative(latents, reference) < LATENT_TOLERANCE
    assert seen and all(dtype == torch.float32 for dtype in seen)  # computed in the pipeline dtype
    layer = dit.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_fp8_scale.dtype == torch.float32
    assert dit.img_in.weight.dtype == torch.float32  # declared high precision
    assert clean.components.modules["text_encoder"].embed_tokens.weight.dtype == torch.float32  # not a Linear
    assert not any(SCALE in key for key in dit.state_dict())  # scales are non-persistent: state_dict keys unchanged


def test_fp8_per_tensor_and_e5m2(clean, reference, generate):
    clean.enable_memory(["fp8"], dtype=torch.float8_e5m2, granularity="tensor")
    layer = clean.components.modules["dit"].transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float8_e5m2 and layer.weight_fp8_scale.shape == (1,)
    assert _relative(generate(clean), reference) < 4 * LATENT_TOLERANCE  # e5m2: one mantissa bit less


@pytest.mark.parametrize(("names", "options"), [(["offload"], {}), (["stream"], {"vram_limit": 0})])
def test_placement_on_top_of_fp8_changes_nothing(clean, generate, split_batches, names, options):
    clean.enable_memory(["fp8"])
    with split_batches(clean):  # placement runs the CFG batch sample by sample
        fp8_alone = generate(clean)
    clean.enable_memory(names, **options)
    assert torch.equal(generate(clean), fp8_alone)


def test_fp8_restores_from_the_files_without_a_host_copy(clean, reference, generate):
    clean.enable_memory(["fp8"], keep_original=False)
    strategy = clean.memory_strategies[0]
    assert all(layer.backup is None for layer in strategy._layers)
    assert 0 < _relative(generate(clean), reference) < LATENT_TOLERANCE
    # `clean` checks that disable_memory() (reading the safetensors files) gives back the exact weights.


def test_fp8_without_kept_originals_or_files_refuses_removal_and_stays_applied(clean, generate):
    files, clean.files = clean.files, {}
    try:
        clean.enable_memory(["fp8"], keep_original=False, components=["vae"])
        with pytest.raises(InputError, match="original weights of the vae: they were not kept"):
            clean.disable_memory()
        assert [s.name for s in clean.memory_strategies] == ["fp8"]  # nothing half-undone
        generate(clean)
    finally:
        clean.files = files  # with the files back, `clean` removes it exactly


@pytest.mark.parametrize(
    ("options", "message"),
    [({"dtype": torch.int8}, "fp8 dtype=torch.int8"), ({"granularity": "row"}, "granularity='row'")],
)
def test_bad_fp8_options(clean, options, message):
    with pytest.raises(InputError, match=message):
        clean.enable_memory(["fp8"], **options)
