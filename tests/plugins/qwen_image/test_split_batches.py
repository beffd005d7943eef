"""Per-sample execution of the Qwen-Image DiT (`split_batches`): block-major order, same ops as each sample's own
loop, what memory strategies see of it (`memory_split_batches`, `memory_activation_bytes`)."""

from __future__ import annotations

import pytest
import torch

from imagezoo.plugins.qwen_image import speed
from imagezoo.plugins.qwen_image.dit import REAL_DIT, DiTParams, QwenImageDiT

TOL = 1e-5  # float32: split and batched forwards differ by rounding only (matrix products of other sizes)
PARAMS = DiTParams(num_layers=4, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
H, W, L = 8, 12, 7  # latent pixels (4x6 patches), text tokens


@pytest.fixture()
def dit(seeded_dit) -> QwenImageDiT:
    return seeded_dit(PARAMS)


def _inputs(batch: int = 2, lengths: tuple[int, ...] | None = None):
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(batch, 16, H, W, generator=gen)
    sigma = torch.rand(batch, generator=gen)
    text = torch.randn(batch, L, PARAMS.text_dim, generator=gen)
    mask = None
    if lengths is not None:
        mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return latents, sigma, text, mask


def _sample_major(dit: QwenImageDiT, start, stop, img, txt, temb_act, img_freqs, txt_freqs, lengths):
    """The per-sample loop as it was before block-major order: each sample through all blocks, then the next."""
    outs = [
        QwenImageDiT.run_blocks(
            dit,
            start,
            stop,
            img[i : i + 1],
            txt[i : i + 1, :n].clone(memory_format=torch.contiguous_format),
            temb_act[i : i + 1],
            img_freqs,
            txt_freqs[:n],
            None,
        )
        for i, n in enumerate(lengths)
    ]
    img = torch.cat([out_img for out_img, _ in outs])
    txt = torch.cat(
        [
            torch.cat([out_txt, txt[i : i + 1, n:]], 1)
            for i, ((_, out_txt), n) in enumerate(zip(outs, lengths, strict=True))
        ]
    )
    return img, txt


@pytest.mark.parametrize("lengths", [None, (7, 4), (3, 7, 5)], ids=["unpadded", "padded", "padded-batch-3"])
def test_block_major_equals_the_sample_major_loop_bit_for_bit(dit, lengths) -> None:
    batch = 2 if lengths is None else len(lengths)
    latents, sigma, text, mask = _inputs(batch, lengths)
    calls = []
    original = dit.run_blocks

    def recording(*args):
        img, txt = original(*args)
        calls.append((args, img, txt))
        return img, txt

    dit.run_blocks = recording  # shadowed on the instance, as sequence parallelism does
    order = []
    handles = [
        block.register_forward_pre_hook(lambda module, args, i=i: order.append(i))
        for i, block in enumerate(dit.transformer_blocks)
    ]
    dit.split_batches = True
    try:
        with torch.no_grad():
            dit(latents, sigma, text, mask)
            forward_order = list(order)
            ((args, img, txt),) = calls
            start, stop, *tensors, split = args
            assert split == (lengths or (L,) * batch)
            expected_img, expected_txt = _sample_major(dit, start, stop, *tensors, split)
    finally:
        for handle in handles:
            handle.remove()
        del dit.run_blocks
    assert torch.equal(img, expected_img)
    # The last block skips the text output (stale either way); padded rows come back unchanged.
    assert torch.equal(txt, expected_txt)
    # Every sample goes through a block before the next block runs.
    assert forward_order == [i for i in range(PARAMS.num_layers) for _ in range(batch)]


@pytest.mark.parametrize("lengths", [None, (7, 4)], ids=["unpadded", "padded"])
def test_split_forward_equals_the_batched_one_up_to_rounding(dit, lengths) -> None:
    latents, sigma, text, mask = _inputs(2, lengths)
    with torch.no_grad():
        batched = dit(latents, sigma, text, mask)
        dit.block_evaluations = 0
        dit.split_batches = True
        split = dit(latents, sigma, text, mask)
        assert dit.block_evaluations == PARAMS.num_layers  # a batch's block counts once
        alone = dit(latents[1:], sigma[1:], text[1:, : 4 if lengths else L])
    assert (split - batched).abs().max().item() <= TOL
    assert (split[1:] - alone).abs().max().item() <= TOL


def test_split_batches_masks(dit) -> None:
    cpu = torch.device("cpu")
    n_img = (H // 2) * (W // 2)
    _, _, _, padded = _inputs(2, (7, 4))
    dit.set_attention_backend("math")  # split_padded_batches' default would not split here
    with torch.no_grad():
        assert dit._joint_mask(None, None, 2, L, n_img, cpu) is None
        assert dit.memory_split_batches(True) is False and dit.split_batches is True
        assert dit._joint_mask(None, None, 2, L, n_img, cpu) == (L, L)
        assert dit._joint_mask(torch.ones(2, L, dtype=torch.bool), None, 2, L, n_img, cpu) == (L, L)
        assert dit._joint_mask(padded, None, 2, L, n_img, cpu) == (7, 4)
        assert dit._joint_mask(None, None, 1, L, n_img, cpu) is None  # one sample: nothing to split
        left = padded.flip(1)  # not a prefix: the key mask handles it
        assert isinstance(dit._joint_mask(left, None, 2, L, n_img, cpu), torch.Tensor)
        full = torch.ones(2, 1, L + n_img, L + n_img, dtype=torch.bool)
        assert dit._joint_mask(None, full, 2, L, n_img, cpu) is full
    # With gradients (training) the batch stays whole.
    assert dit._joint_mask(None, None, 2, L, n_img, cpu) is None
    assert isinstance(dit._joint_mask(padded, None, 2, L, n_img, cpu), torch.Tensor)
    assert dit.memory_split_batches(False) is True and dit.split_batches is False


def test_step_cache_runs_partial_ranges_per_sample_exactly(dit) -> None:
    latents, _, text, mask = _inputs(2, (7, 4))
    dit.split_batches = True

    def sample() -> torch.Tensor:
        sigmas = torch.linspace(1.0, 0.0, 5)
        x = latents
        for i in range(4):
            x = x + (sigmas[i + 1] - sigmas[i]) * dit(x, sigmas[i].expand(2), text, mask)
        return x

    with torch.no_grad():
        expected = sample()
        dit.block_evaluations = 0
        speed.enable_step_cache(dit, threshold=0.0)  # never skips: blocks 0..1 then 1..n, per sample
        got = sample()
    assert torch.equal(got, expected)
    assert dit.block_evaluations == 4 * PARAMS.num_layers


def test_activation_estimate() -> None:
    with torch.device("meta"):
        real = QwenImageDiT(REAL_DIT)
    real.compute_dtype = torch.bfloat16
    latents = torch.empty(2, 16, 166, 166, device="meta")  # 1328x1328 pixels
    text = torch.empty(2, 20, REAL_DIT.text_dim, device="meta")
    sigma = torch.empty(2, device="meta")
    with torch.no_grad():
        whole = real.memory_activation_bytes(latents, sigma, text)
        # The measurement the coefficient comes from: about 1.0 GiB for this CFG batch run whole.
        assert 1.0 <= whole / 1024**3 <= 1.25
        real.split_batches = True
        assert real.memory_activation_bytes(latents, sigma, text) == whole // 2
        assert real.memory_activation_bytes(latents, sigma, text, attention_mask=torch.empty(0)) == whole
        small = real.memory_activation_bytes(latents[..., :83, :83], sigma, text)
        assert small < whole // 2 / 3  # about a quarter of the tokens
    assert real.memory_activation_bytes(latents, sigma, text) == whole  # with gradients: never split


def test_low_activation_mode_chunks_the_mlps_and_joins_attention_inputs(dit, monkeypatch) -> None:
    from imagezoo.plugins.qwen_image import dit as dit_module

    monkeypatch.setattr(dit_module, "_MLP_CHUNK_TOKENS", 5)  # the tiny inputs have more tokens than that
    latents, sigma, text, mask = _inputs(2, (L, L - 3))
    dit.memory_split_batches(True)
    mlps = [m for m in dit.modules() if isinstance(m, dit_module._MLP)]
    attentions = [m for m in dit.modules() if isinstance(m, dit_module._JointAttention)]
    assert all(m.chunk_tokens == 5 for m in mlps) and all(a.low_activation for a in attentions)
    with torch.no_grad():
        low = dit(latents, sigma, text, mask)
        for module in mlps:
            module.chunk_tokens = None
        no_chunks = dit(latents, sigma, text, mask)
        for attention in attentions:
            attention.low_activation = False
        plain = dit(latents, sigma, text, mask)
    # Joining q/k/v from temporaries is the same maths on the same values; MLP chunks are GEMMs of fewer rows.
    assert torch.equal(no_chunks, plain)
    torch.testing.assert_close(low, plain, rtol=1e-5, atol=1e-6)
    dit.memory_split_batches(False)
    assert all(m.chunk_tokens is None for m in mlps) and not any(a.low_activation for a in attentions)


def test_mlp_chunks_only_weights_stored_in_the_compute_dtype() -> None:
    from imagezoo.plugins.qwen_image.dit import _MLP

    torch.manual_seed(0)
    mlp = _MLP(8).eval()
    mlp.chunk_tokens = 2
    x = torch.randn(1, 7, 8)
    calls = []
    layers = (mlp.net[0].proj, mlp.net[2])
    hooks = [layer.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in layers]
    with torch.no_grad():
        plain = mlp.net(x)
        calls.clear()
        torch.testing.assert_close(mlp(x), plain, rtol=1e-6, atol=1e-6)
        assert len(calls) == 2 * 4  # 7 tokens, chunks of 2

        # Storage in another dtype, restored to the compute dtype around each call (what FP8 storage does): one call
        # per layer, since each call pays a dequantization pass.
        def restore(module, args):
            module.weight.data = module.weight.data.float()

        def store(module, args, output):
            module.weight.data = module.weight.data.double()

        for layer in layers:
            layer.weight.data = layer.weight.data.double()
            hooks += [layer.register_forward_pre_hook(restore), layer.register_forward_hook(store)]
        calls.clear()
        torch.testing.assert_close(mlp(x), plain, rtol=1e-6, atol=1e-6)
        assert len(calls) == 2
    for hook in hooks:
        hook.remove()
