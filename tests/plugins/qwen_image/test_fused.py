"""Fused DiT ops: the q/k norm + RoPE op equals the per-stream ops, on CPU, in Triton's interpreter and on CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagezoo.plugins.qwen_image import fused
from imagezoo.plugins.qwen_image.dit import DiTParams, _apply_rope, _modulate, _residual, _RMSNorm

PARAMS = DiTParams(num_layers=3, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
TOL = 1e-5
CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[3]


def _streams(b: int, n_txt: int, n_img: int, heads: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    txt = torch.randn(b, n_txt, heads, dim, generator=gen).to(dtype)
    img = (3 * torch.randn(b, n_img, heads, dim, generator=gen)).to(dtype)
    weights = (torch.rand(dim, generator=gen) + 0.5, torch.rand(dim, generator=gen) + 0.5)
    angles = torch.randn(n_txt + n_img, dim // 2, generator=gen)
    freqs = torch.stack([angles.cos(), angles.sin()], -1)
    return txt, img, weights, freqs[:n_txt].contiguous(), freqs[n_txt:].contiguous()


def _per_stream(txt, img, weights, txt_freqs, img_freqs, eps=1e-6):
    """What the DiT computes without the fused op: each stream normalized and rotated, then joined."""
    norms = []
    for weight in weights:
        norm = _RMSNorm(weight.shape[0], eps)
        norm.weight.data.copy_(weight)
        norms.append(norm)
    with torch.no_grad():
        return torch.cat([_apply_rope(norms[0](txt), txt_freqs), _apply_rope(norms[1](img), img_freqs)], 1)


def test_joint_qk_norm_rope_equals_per_stream_ops() -> None:
    txt, img, weights, txt_freqs, img_freqs = _streams(2, 5, 12, 3, 16)
    out = fused.joint_qk_norm_rope(txt, img, *weights, txt_freqs, img_freqs, 1e-6)
    assert out.shape == (2, 17, 3, 16)
    assert (out - _per_stream(txt, img, weights, txt_freqs, img_freqs)).abs().max().item() <= TOL


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_joint_qk_norm_rope_triton_kernel_interpreted() -> None:
    # Interpreter mode is read when kernels are defined, so the kernel runs in a fresh interpreter.
    script = textwrap.dedent(
        """
        import torch
        from imagezoo.plugins.qwen_image import fused
        from tests.plugins.qwen_image.test_fused import _streams
        worst = 0.0
        for shape, dtype in (((1, 5, 12, 2, 16), torch.float32), ((2, 3, 7, 3, 8), torch.float32),
                             ((2, 3, 40, 24, 128), torch.bfloat16), ((1, 4, 9, 3, 16), torch.float16)):
            txt, img, weights, tf, imf = _streams(*shape, dtype=dtype, seed=1)
            ref = torch.cat([fused._norm_rope_reference(txt.float(), weights[0], tf, 1e-6),
                             fused._norm_rope_reference(img.float(), weights[1], imf, 1e-6)], 1)
            out = fused._launch_joint_qk_norm_rope(txt, img, *weights, tf, imf, 1e-6)
            assert out.dtype == dtype and out.shape == ref.shape
            ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(dtype, 1e-6)  # one rounding to the dtype
            worst = max(worst, ((out.float() - ref).abs() - ulp * ref.abs()).max().item())
        print(worst)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) <= 1e-6


def test_linear_after_equals_projecting_then_joining() -> None:
    gen = torch.Generator().manual_seed(3)
    text_values = torch.randn(2, 9, 12, generator=gen)
    x, weight, bias = torch.randn(2, 5, 8, generator=gen), torch.randn(12, 8, generator=gen), torch.randn(12)
    head = text_values[1:, :4]  # one sample's real text rows: a view, as the per-sample attention passes them
    for rows, inputs in ((text_values, x), (head, x[1:])):
        got = fused.linear_after(rows, inputs, weight, bias)
        expected = torch.cat([rows, F.linear(inputs, weight, bias)], 1)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def _dit_outputs(dit, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 16, 8, 12, generator=gen).to(device, dtype)
    text = torch.randn(2, 7, PARAMS.text_dim, generator=gen).to(device, dtype)
    sigma = torch.tensor([0.3, 0.3], device=device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    with torch.no_grad():
        return [dit(latents[:1], sigma[:1], text[:1]), dit(latents, sigma, text, mask)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
def test_dit_with_fused_qk_equals_the_default(seeded_dit, device) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dit = seeded_dit(PARAMS).to(device, dtype)
    dit.split_padded_batches = True  # the CFG batch attends per sample: the op runs on per-sample slices too
    expected = _dit_outputs(dit, device, dtype)
    dit.enable_speed("off", fused_qk=True)
    assert all(block.attn.fused_qk for block in dit.transformer_blocks)
    got = _dit_outputs(dit, device, dtype)
    dit.disable_speed()
    assert not dit.transformer_blocks[0].attn.fused_qk
    tol = TOL if device == "cpu" else 2e-2  # bf16: the op rounds once, the per-stream ops twice
    for out, ref in zip(got, expected, strict=True):
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() <= tol


def _modulation_inputs(b: int, n: int, width: int, mod_batch: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(b, n, width, generator=gen) + 0.5).to(dtype)
    update = torch.randn(b, n, width, generator=gen).to(dtype)
    # Views of one (B, 3 * D) tensor, as the block's `chunk` of its modulation gives them.
    mod = (0.5 * torch.randn(mod_batch, 1, 3 * width, generator=gen)).to(dtype)
    gate, shift, scale = mod.chunk(3, -1)
    return x, update, gate, shift, scale


@pytest.mark.parametrize("mod_batch", [1, 2])
def test_modulate_norm_ops_equal_the_block_ops(mod_batch) -> None:
    x, update, gate, shift, scale = _modulation_inputs(2, 7, 24, mod_batch)
    expected = _modulate(x, shift, scale, 1e-6)
    assert (fused.modulate_norm(x, shift, scale, 1e-6) - expected).abs().max().item() <= TOL
    residual, normed = fused.residual_modulate_norm(x, update, gate, shift, scale, 1e-6)
    ref_residual, ref_normed = _residual(x, update, gate, shift, scale, 1e-6)
    assert (residual - ref_residual).abs().max().item() <= TOL
    assert (normed - ref_normed).abs().max().item() <= TOL
    # Per-sample pieces of the update (as attention run per sample gives them), in the op and in the block's path.
    pieces = list(update.split(1))
    got_fused = fused.residual_modulate_norm(x, pieces, gate, shift, scale, 1e-6)
    got_block = _residual(x, pieces, gate, shift, scale, 1e-6)
    for got, ref in zip(got_fused + got_block, (residual, normed, ref_residual, ref_normed), strict=True):
        assert torch.equal(got, ref)


def test_modulate_norm_rejects_mismatched_shapes() -> None:
    x, update, gate, shift, scale = _modulation_inputs(2, 7, 24, 2)
    with pytest.raises(ValueError, match=r"\(B, N, D\).*\(2, 7, 24\)"):
        fused.modulate_norm(x, shift[..., :12], scale, 1e-6)
    with pytest.raises(ValueError, match=r"update \(2, 6, 24\)"):
        fused.residual_modulate_norm(x, update[:, :6], gate, shift, scale, 1e-6)
    # Pieces that cover one of the two samples.
    with pytest.raises(ValueError, match=r"update pieces \[\(1, 7, 24\)\].*\(2, 7, 24\)"):
        fused.residual_modulate_norm(x, [update[:1]], gate, shift, scale, 1e-6)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_modulate_norm_triton_kernel_interpreted() -> None:
    script = textwrap.dedent(
        """
        import torch
        from imagezoo.plugins.qwen_image import fused
        from tests.plugins.qwen_image.test_fused import _modulation_inputs
        worst = 0.0
        for shape, dtype in (((2, 5, 48, 2), torch.float32), ((2, 3, 40, 1), torch.bfloat16),
                             ((1, 4, 3072, 1), torch.bfloat16), ((2, 3, 16, 2), torch.float16)):
            x, update, gate, shift, scale = _modulation_inputs(*shape, dtype=dtype, seed=2)
            ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(dtype, 1e-6)  # one rounding to the dtype
            ref_residual = (x.float() + gate.float() * update.float()).to(dtype).float()
            plain = fused._modulate_norm_reference(x, shift, scale, 1e-6).float()
            residual, normed = fused._launch_modulate_norm(x, [update], gate, shift, scale, 1e-6)
            _, alone = fused._launch_modulate_norm(x, None, None, shift, scale, 1e-6)
            assert residual.dtype == normed.dtype == alone.dtype == dtype
            # The update in per-sample pieces (one launch each) gives the same rows as in one piece.
            pieces = fused._launch_modulate_norm(x, list(update.split(1)), gate, shift, scale, 1e-6)
            assert all(torch.equal(a, b) for a, b in zip(pieces, (residual, normed)))
            # The interpreter rounds to bf16 its own way (the GPU: to nearest), so the residual is checked to one ulp
            # and the norm against the reference applied to the kernel's own residual.
            ref_normed = fused._modulate_norm_reference(residual, shift, scale, 1e-6).float()
            for out, ref in ((residual, ref_residual), (normed, ref_normed), (alone, plain)):
                worst = max(worst, ((out.float() - ref).abs() - ulp * ref.abs() - 1e-5).max().item())
        print(worst)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) <= 0.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
def test_dit_with_fused_norm_equals_the_default(seeded_dit, device) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dit = seeded_dit(PARAMS).to(device, dtype)
    dit.split_padded_batches = True
    expected = _dit_outputs(dit, device, dtype)
    dit.enable_speed("off", fused_norm=True)
    assert all(block.fused_norm for block in dit.transformer_blocks)
    got = _dit_outputs(dit, device, dtype)
    dit.disable_speed()
    assert not dit.transformer_blocks[0].fused_norm
    tol = TOL if device == "cpu" else 2e-2  # bf16: the op rounds once, the block's ops once per op
    for out, ref in zip(got, expected, strict=True):
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() <= tol
