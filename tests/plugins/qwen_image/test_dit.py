"""Qwen-Image DiT: parity with diffusers (float32), checkpoint handling, params, packing, overrides, checkpointing."""

from __future__ import annotations

import pytest
import torch

from imagezoo.errors import ConfigError, WeightsError
from imagezoo.plugins.qwen_image.dit import (
    DIT_KEY_MARKERS,
    REAL_DIT,
    TINY_DIT,
    DiTParams,
    QwenImageDiT,
    build_dit,
    is_dit_checkpoint,
    pack_latents,
    unpack_latents,
)

TOL = 1e-5  # float32 max-abs tolerance against diffusers and between equivalent calls
B, H, W, L = 2, 8, 12, 7  # latent 8x12 (non-square) -> 4x6 patches; 7 text tokens
REAL_LEN = 5  # sample 1 has 2 padding tokens at the end


def _random_state_dict(params: DiTParams, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial norms/modulation (default init leaves norm weights at 1)."""
    torch.manual_seed(seed)
    module = QwenImageDiT(params)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.2 if "norm" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "norm" in name else 0.0))
    return module.state_dict()


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return _random_state_dict(TINY_DIT)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(B, 16, H, W, generator=gen)
    sigma = torch.tensor([0.37, 0.91])
    text = torch.randn(B, L, TINY_DIT.text_dim, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, REAL_LEN:] = False
    return latents, sigma, text, mask


@pytest.fixture(scope="module")
def tiny(tiny_sd: dict[str, torch.Tensor]) -> QwenImageDiT:
    return build_dit(tiny_sd, TINY_DIT.to_config())


def test_parity_with_diffusers_float32(tiny_sd, tiny, inputs) -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.QwenImageTransformer2DModel.from_config(TINY_DIT.to_config()).eval()
    ref.load_state_dict(tiny_sd, strict=True)
    latents, sigma, text, mask = inputs
    h, w = H // 2, W // 2
    with torch.no_grad():
        ours = tiny(latents, sigma, text, mask)
        # diffusers takes packed tokens, sigma as `timestep`, the (frame, h, w) patch grid, and returns packed tokens.
        theirs = ref(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=[[(1, h, w)]] * B,
            return_dict=False,
        )[0]
    assert ours.shape == latents.shape and ours.dtype == torch.float32
    assert (ours - unpack_latents(theirs, H, W)).abs().max().item() <= TOL
    assert theirs.abs().max().item() > 0.1  # not a vacuous comparison of near-zero outputs

    # The padded sample equals that sample run alone with its padding trimmed off (a batch of one takes the fused
    # LayerNorm path, so this also checks it); and a lone unpadded sample matches diffusers directly.
    with torch.no_grad():
        alone = tiny(latents[1:], sigma[1:], text[1:, :REAL_LEN])
        first = tiny(latents[:1], sigma[:1], text[:1])
        theirs_first = ref(
            hidden_states=pack_latents(latents[:1]),
            encoder_hidden_states=text[:1],
            timestep=sigma[:1],
            img_shapes=[[(1, h, w)]],
            return_dict=False,
        )[0]
    assert (ours[1:] - alone).abs().max().item() <= TOL
    assert (first - unpack_latents(theirs_first, H, W)).abs().max().item() <= TOL


def test_mask_semantics(tiny, inputs) -> None:
    latents, sigma, text, mask = inputs
    with torch.no_grad():
        base = tiny(latents, sigma, text, mask)
        garbage = text.clone()
        garbage[1, REAL_LEN:] = 1e3  # padded tokens must not influence the image
        assert (tiny(latents, sigma, garbage, mask) - base).abs().max().item() <= TOL
        all_real = torch.ones(B, L, dtype=torch.bool)
        assert torch.equal(tiny(latents, sigma, text, all_real), tiny(latents, sigma, text))
        assert (tiny(latents, sigma, text) - base)[1].abs().max().item() > 1e-3  # mask is really applied


def test_build_dit_names_bad_keys(tiny_sd) -> None:
    missing = dict(tiny_sd)
    del missing["transformer_blocks.1.attn.norm_added_k.weight"]
    with pytest.raises(WeightsError, match=r"transformer_blocks\.1\.attn\.norm_added_k\.weight"):
        build_dit(missing, TINY_DIT.to_config())

    extra = {**tiny_sd, "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}
    with pytest.raises(WeightsError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A\.weight"):
        build_dit(extra, TINY_DIT.to_config())

    misshaped = {**tiny_sd, "proj_out.bias": torch.zeros(65)}
    with pytest.raises(WeightsError, match=r"proj_out\.bias"):
        build_dit(misshaped, TINY_DIT.to_config())


def test_build_dit_dtype_and_meta_free(tiny_sd) -> None:
    module = build_dit(tiny_sd, TINY_DIT.to_config(), dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in module.parameters())
    assert not list(module.buffers())  # nothing outside the checkpoint that would need re-initialising
    out = module(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, TINY_DIT.text_dim))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16, 4, 4)


def test_real_params_on_meta() -> None:
    with torch.device("meta"):
        module = QwenImageDiT(REAL_DIT)
    sd = module.state_dict()
    assert len(sd) == 1933
    assert sum(p.numel() for p in module.parameters()) == 20_430_401_088
    assert is_dit_checkpoint(sd.keys()) and set(sd) >= DIT_KEY_MARKERS
    assert DiTParams.from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == REAL_DIT


def test_params_round_trips() -> None:
    small = DiTParams(num_layers=3, num_heads=2, head_dim=32, text_dim=24, axes_dims=(4, 14, 14))
    with torch.device("meta"):
        sd = QwenImageDiT(small).state_dict()
    assert DiTParams.from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == small
    for params in (REAL_DIT, TINY_DIT, small):
        assert DiTParams.from_config(params.to_config()) == params
    assert REAL_DIT.to_config()["_class_name"] == "QwenImageTransformer2DModel"
    # The published config.json, with keys we ignore.
    published = {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.34.0.dev0",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": 3584,
        "num_attention_heads": 24,
        "num_layers": 60,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 768,
    }
    assert DiTParams.from_config(published) == REAL_DIT


def test_params_errors(tiny_sd) -> None:
    with pytest.raises(ConfigError, match="guidance_embeds"):
        DiTParams.from_config({**REAL_DIT.to_config(), "guidance_embeds": True})
    # head_dim 16 -> (2, 7, 7): odd axes can't come from shapes alone.
    with pytest.raises(ConfigError, match=r"config\.json"):
        DiTParams.from_shapes({k: tuple(v.shape) for k, v in tiny_sd.items()})
    with pytest.raises(ConfigError, match="sum to head_dim"):
        DiTParams(head_dim=64, num_heads=2)
    assert not is_dit_checkpoint(k for k in tiny_sd if k != "txt_norm.weight")


def test_pack_unpack() -> None:
    x = torch.randn(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 12)
    assert torch.equal(unpack_latents(tokens, 4, 6), x)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                # token (row 1, col 2) = patch at latent pixels (2+dy, 4+dx)
                assert tokens[0, 1 * 3 + 2, c * 4 + dy * 2 + dx] == x[0, c, 2 + dy, 4 + dx]


def test_overrides_default_equivalent(tiny, inputs) -> None:
    latents, sigma, text, mask = inputs
    h, w = H // 2, W // 2
    n = L + h * w
    positions = torch.arange(L) + max(h // 2, w // 2)
    keys = torch.cat([mask, torch.ones(B, h * w, dtype=torch.bool)], dim=1)
    joint = keys[:, None, None, :].expand(B, 1, n, n)
    with torch.no_grad():
        base = tiny(latents, sigma, text, mask)
        assert (tiny(latents, sigma, text, mask, text_positions=positions) - base).abs().max().item() <= TOL
        assert (tiny(latents, sigma, text, attention_mask=joint) - base).abs().max().item() <= TOL
        # ...and they are really used: other positions / a stricter mask change the result.
        assert (tiny(latents, sigma, text, mask, text_positions=positions * 0) - base).abs().max().item() > 1e-3
        no_text = joint.clone()
        no_text[:, :, L:, :L] = False
        assert (tiny(latents, sigma, text, attention_mask=no_text) - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_same_grads(tiny_sd, inputs, offload) -> None:
    latents, sigma, text, mask = inputs

    def grads(checkpointing: bool) -> dict[str, torch.Tensor | None]:
        module = build_dit(tiny_sd, TINY_DIT.to_config()).train()
        for p in module.parameters():
            p.requires_grad_(True)
        if checkpointing:
            module.enable_gradient_checkpointing(offload_to_cpu=offload)
        out = module(latents, sigma, text, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {k: p.grad for k, p in module.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    last = f"transformer_blocks.{TINY_DIT.num_layers - 1}."
    for key, g in plain.items():
        unused = ("txt_mlp.", "attn.to_add_out.", "attn.add_q_proj.", "attn.norm_added_q.")
        if key.startswith(tuple(last + u for u in unused)):
            assert g is None and ckpt[key] is None  # the last block's text output is never computed
        else:
            assert g is not None and g.abs().max() > 0, key
            assert (g - ckpt[key]).abs().max().item() <= TOL, key


def test_cached_rope_survives_inference_mode(tiny_sd, inputs) -> None:
    latents, sigma, text, mask = inputs
    module = build_dit(tiny_sd, TINY_DIT.to_config())
    with torch.inference_mode():  # e.g. validation sampling inside a training loop fills the RoPE cache
        module(latents, sigma, text, mask)
    module.img_in.weight.requires_grad_(True)
    module(latents, sigma, text, mask).square().mean().backward()
    assert module.img_in.weight.grad is not None
