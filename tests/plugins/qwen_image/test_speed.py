"""Speed options of the Qwen-Image DiT on CPU: exact options equal the default path, lossy ones do what they say."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from imagezoo.errors import InputError
from imagezoo.plugins.qwen_image import attention, fused, speed
from imagezoo.plugins.qwen_image import dit as dit_module
from imagezoo.plugins.qwen_image.dit import DiTParams, QwenImageDiT

TOL = 1e-5
PARAMS = DiTParams(num_layers=4, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
SIZES = ((8, 8), (8, 12), (16, 10))  # latent pixels: 3 resolutions (non-square too)
LENGTHS = (5, 9, 13)  # 3 prompt lengths


@pytest.fixture()
def dit(seeded_dit) -> QwenImageDiT:
    return seeded_dit(PARAMS)


def _inputs(h: int, w: int, length: int, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 1000 + h * 37 + w * 7 + length)
    latents = torch.randn(batch, 16, h, w, generator=gen)
    sigma = torch.rand(batch, generator=gen)
    text = torch.randn(batch, length, PARAMS.text_dim, generator=gen)
    return latents, sigma, text


def _padded_batch():
    latents, sigma, text = _inputs(8, 12, 7, batch=2, seed=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return latents, sigma, text, mask


def _eligen_mask(length: int, n_img: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    n = length + n_img
    mask = torch.rand(2, 1, n, n, generator=gen) > 0.3
    mask |= torch.eye(n, dtype=torch.bool)  # every query keeps at least one key
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Attention backends


@pytest.mark.parametrize("backend", attention.BACKENDS)
def test_every_attention_backend_matches_default(dit, backend) -> None:
    latents, sigma, text, mask = _padded_batch()
    full = _eligen_mask(7, 24)
    with torch.no_grad():
        expected = [
            dit(latents, sigma, text),
            dit(latents, sigma, text, mask),
            dit(latents, sigma, text, attention_mask=full),
        ]
        dit.set_attention_backend(backend)
        assert dit.attention_backend == backend
        got = [
            dit(latents, sigma, text),
            dit(latents, sigma, text, mask),
            dit(latents, sigma, text, attention_mask=full),
        ]
    for out, ref in zip(got, expected, strict=True):
        assert (out - ref).abs().max().item() <= TOL


def test_padded_batch_split_per_sample(dit) -> None:
    latents, sigma, text, mask = _padded_batch()
    n_img = (8 // 2) * (12 // 2)
    cpu = torch.device("cpu")
    with torch.no_grad():
        # Default: split on CUDA under "auto" attention only (where it was measured); one masked batch on CPU.
        assert dit.split_padded_batches is None
        assert dit._joint_mask(mask, None, 2, 7, n_img, cpu).shape == (2, 1, 1, 7 + n_img)
        masked = dit(latents, sigma, text, mask)
        dit.split_padded_batches = True
        assert dit._joint_mask(mask, None, 2, 7, n_img, cpu) == (7, 4)
        split = dit(latents, sigma, text, mask)
        left = mask.flip(1)  # left padding is no prefix: the key mask handles it
        assert isinstance(dit._joint_mask(left, None, 2, 7, n_img, cpu), torch.Tensor)
        alone = dit(latents[1:], sigma[1:], text[1:, :4])
    assert (split - masked).abs().max().item() <= TOL
    assert (split[1:] - alone).abs().max().item() <= TOL
    # With gradients (training) the batch stays whole.
    assert isinstance(dit._joint_mask(mask, None, 2, 7, n_img, cpu), torch.Tensor)


def test_padded_batch_shares_linears_and_attends_per_sample(dit) -> None:
    latents, sigma, text, mask = _padded_batch()
    dit.split_padded_batches = True
    with torch.no_grad():
        masked_dit = dit(latents, sigma, text, mask)
        assert dit.share_padded_linears  # the default: weights read once for the batch
        shared = dit(latents, sigma, text, mask)
        dit.share_padded_linears = False
        apart = dit(latents, sigma, text, mask)
        # The text stream too: real rows as when each sample runs alone, padded rows as they came in.
        img, txt, temb_act, img_freqs, txt_freqs = _block_inputs(dit, latents, sigma, text)
        apart_blocks = dit.run_blocks(0, 3, img, txt, temb_act, img_freqs, txt_freqs, (7, 4))
        dit.share_padded_linears = True
        dit.block_evaluations = 0
        shared_blocks = dit.run_blocks(0, 3, img, txt, temb_act, img_freqs, txt_freqs, (7, 4))
    assert dit.block_evaluations == 3
    assert (shared - apart).abs().max().item() <= TOL
    assert (shared - masked_dit).abs().max().item() <= TOL
    for got, ref in zip(shared_blocks, apart_blocks, strict=True):
        assert (got - ref).abs().max().item() <= TOL
    assert torch.equal(shared_blocks[1][1, 4:], txt[1, 4:])
    assert not torch.equal(shared_blocks[1][1, :4], txt[1, :4])


def test_mask_facts_are_read_once_per_mask_tensor(dit) -> None:
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    assert dit._mask_facts(mask) == ((7, 4), True)
    assert dit._mask_cache[0]() is mask  # the next step's call with this tensor reads no GPU value
    mask[0, 5:] = False  # changed in place: the version counter tells
    assert dit._mask_facts(mask) == ((5, 4), True)
    other = mask.flip(1)  # another tensor: read again (left padding is no prefix)
    assert dit._mask_facts(other) == ((5, 4), False)
    with torch.inference_mode():  # inference tensors have no version counter: the tensor object is the key
        frozen = torch.ones(1, 3, dtype=torch.bool)
        assert dit._mask_facts(frozen) == ((3,), True)
        assert dit._mask_cache[1] is None and dit._mask_facts(frozen) == ((3,), True)


def _block_inputs(dit: QwenImageDiT, latents, sigma, text):
    """What `QwenImageDiT.forward` hands the blocks (for `run_blocks` called directly)."""
    from imagezoo.plugins.qwen_image.dit import _timestep_sinusoid, pack_latents

    img = dit.img_in(pack_latents(latents))
    txt = dit.txt_in(dit.txt_norm(text))
    temb_act = F.silu(dit.time_text_embed.timestep_embedder(_timestep_sinusoid(sigma)))
    h, w = latents.shape[2] // 2, latents.shape[3] // 2
    txt_freqs = dit._default_text_freqs(max(h // 2, w // 2), text.shape[1], latents.device)
    return img, txt, temb_act, dit._image_freqs(h, w, latents.device), txt_freqs


def test_varlen_key_order_equals_masked_attention() -> None:
    gen = torch.Generator().manual_seed(5)
    b, n_txt, n_img, heads, dim = 3, 6, 10, 2, 8
    q = torch.randn(b, n_txt + n_img, heads, dim, generator=gen)
    k_txt, v_txt = torch.randn(2, b, n_txt, heads, dim, generator=gen)
    k_img, v_img = torch.randn(2, b, n_img, heads, dim, generator=gen)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)  # holes too
    mask = torch.cat([valid, torch.ones(b, n_img, dtype=torch.bool)], 1)[:, None, None, :]

    order, used = attention.padded_key_order(mask, n_txt)
    assert used.tolist() == [16, 13, 13]
    assert order[1].tolist() == list(range(6))  # right padding: identity
    assert order[2, :3].tolist() == [1, 3, 4]  # real tokens first, in order

    out = attention._padded_varlen(q, k_txt, k_img, v_txt, v_img, mask, fa3=False)
    k, v = torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    assert (out - ref.transpose(1, 2)).abs().max().item() <= TOL


def test_backend_resolution_and_errors() -> None:
    cpu = torch.device("cpu")
    assert attention.resolve_backend("auto", cpu, "padding", torch.bfloat16) == "sdpa"
    assert attention.resolve_backend("varlen", cpu, "padding", torch.float32) == "sdpa"  # CUDA-only kernel
    assert attention.resolve_backend("flash", cpu, "none", torch.float32) == "flash"
    # CUDA choices need no GPU to resolve (no FA3 here).
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert attention.resolve_backend("auto", cuda, "none", bf16) == "auto-sdpa"
    assert attention.resolve_backend("auto", cuda, "full", bf16) == "auto-sdpa"
    assert attention.resolve_backend("auto", cuda, "padding", torch.float32) == "sdpa"
    assert attention.resolve_backend("varlen", cuda, "none", bf16) == "flash"
    with torch.no_grad():
        assert attention.resolve_backend("auto", cuda, "padding", bf16) == attention.AUTO_PADDING
        assert attention.resolve_backend("varlen", cuda, "padding", bf16) == "varlen"
    with torch.enable_grad():  # per-sample key counts have no backward: training keeps the masked kernels
        assert attention.resolve_backend("auto", cuda, "padding", bf16) == "auto-sdpa"
        assert attention.resolve_backend("varlen", cuda, "padding", bf16) == "sdpa"
    assert attention.mask_kind(None) == "none"
    assert attention.mask_kind(torch.ones(2, 1, 1, 9, dtype=torch.bool)) == "padding"
    assert attention.mask_kind(torch.ones(2, 1, 9, 9, dtype=torch.bool)) == "full"
    with pytest.raises(InputError, match="Unknown attention backend 'fast'"):
        attention.check_backend("fast")
    with pytest.raises(InputError, match="Unknown attention backend"):
        QwenImageDiT(PARAMS).set_attention_backend("fast")


# ----------------------------------------------------------------------------------------------------------------------
# Regional compile


def _sweep(dit: QwenImageDiT) -> list[torch.Tensor]:
    """Batch 1 at 3 resolutions x 3 prompt lengths, plus a padded batch of 2 at each resolution."""
    outs = []
    for index, (h, w) in enumerate(SIZES):
        for length in LENGTHS:
            outs.append(dit(*_inputs(h, w, length)))
        latents, sigma, text = _inputs(h, w, LENGTHS[-1], batch=2)
        mask = torch.ones(2, LENGTHS[-1], dtype=torch.bool)
        mask[1, LENGTHS[index] - 2 :] = False  # a CFG-like batch: its short prompt's length varies too
        outs.append(dit(latents, sigma, text, mask))
    return outs


def test_compiled_blocks_exact_and_no_recompiles(dit) -> None:
    # Inductor where a C compiler exists (the real thing), else dynamo alone: the recompile logic is the same.
    backend = "inductor" if speed.compile_available(torch.device("cpu")) else "eager"
    dit.split_padded_batches = True  # the GPU path: CFG batches attend per sample, unmasked
    with torch.no_grad():
        expected = _sweep(dit)
        state = dit.enable_speed("exact", compile_backend=backend)
        assert state.config.compile and state.config.fused_gelu and state.counter.compiles == 0
        # Warm-up: one resolution and prompt length per variant (batch 1 unmasked, batch 2 padded).
        dit(*_inputs(*SIZES[0], LENGTHS[0]))
        latents, sigma, text, mask = _padded_batch()
        dit(latents, sigma, text, mask)
        warm = state.counter.compiles
        # dynamo recompiles only when a guard fails: a few variants (batch 1 / batch N, mask / none, the last block
        # without text output), each compiled once.
        assert 0 < warm <= 6
        got = _sweep(dit)
        assert state.counter.compiles == warm, "a new resolution or prompt length recompiled"
        dit.disable_speed()
        assert all(block._compiled_call_impl is None for block in dit.transformer_blocks)
    for out, ref in zip(got, expected, strict=True):
        assert (out - ref).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# Fused GELU epilogue


def test_fused_gelu_equals_unfused_and_respects_hooks(dit, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(fused.linear_gelu_tanh(x, linear.weight, linear.bias), F.gelu(linear(x), approximate="tanh"))
    assert fused.is_plain_linear(linear)
    handle = linear.register_forward_hook(lambda module, args, out: out * 2)  # how LoRA attaches
    assert not fused.is_plain_linear(linear)
    handle.remove()

    fused_calls, hooked_calls = [], []

    def counting(*args):
        fused_calls.append(1)
        return fused.linear_gelu_tanh(*args)

    monkeypatch.setattr(dit_module, "linear_gelu_tanh", counting)
    latents, sigma, text, mask = _padded_batch()
    proj = dit.transformer_blocks[0].img_mlp.net[0]
    with torch.no_grad():
        expected = dit(latents, sigma, text, mask)
        assert not fused_calls
        dit.enable_speed("off", fused_gelu=True)
        assert proj.fused_gelu
        got = dit(latents, sigma, text, mask)
        assert len(fused_calls) == 2 * PARAMS.num_layers - 1  # both streams; the last block has no text MLP
        hook = proj.proj.register_forward_hook(lambda module, args, out: hooked_calls.append(1))
        dit(latents, sigma, text, mask)
        hook.remove()
        dit.disable_speed()
    assert not proj.fused_gelu
    assert hooked_calls == [1]  # a hooked layer (LoRA, FP8 storage) keeps the plain path
    assert (got - expected).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# FP8 compute


def test_fp8_quantization_rowwise() -> None:
    x = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]
    x[2] = 0.0
    q, scale = speed.quantize_fp8_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    back = q.float() * scale
    assert torch.isfinite(back).all() and torch.equal(back[2], x[2])
    rel = (back - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)
    assert rel.max().item() < 0.04  # e4m3: 3 mantissa bits, each row scaled to its own range
    assert q.float().abs().amax(dim=1)[[0, 1, 3, 4]].eq(speed.FP8_MAX).all()


def test_fp8_linear_modes_agree() -> None:
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    weight, scale = speed.quantize_fp8_rowwise(linear.weight)
    x = torch.randn(3, 37, 64, generator=gen)  # 111 tokens: not a multiple of 16
    emulated = speed.fp8_linear(x, weight, scale.reshape(1, -1), linear.bias, "emulate", torch.float32)
    with torch.no_grad():
        exact = linear(x)
    rel = ((emulated - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.06  # really quantized, and only by FP8 rounding
    mode = speed._probe_fp8_mode("cpu", None, torch.float32)
    out = speed.fp8_linear(x, weight, scale.reshape(1, -1), linear.bias, mode, torch.float32)
    assert (out - emulated).abs().max().item() <= 1e-4 * emulated.abs().max().item()


def test_fp8_compute_knob(dit) -> None:
    latents, sigma, text, mask = _padded_batch()
    keys = {k: v.dtype for k, v in dit.state_dict().items()}
    with torch.no_grad():
        exact = dit(latents, sigma, text, mask)
        state = dit.enable_speed("fp8", compile=False)
        assert state.fp8_mode in ("scaled_mm", "scaled_mm_bias", "emulate")
        converted = speed.fp8_linears(dit)
        assert len(converted) == PARAMS.num_layers * len(speed.FP8_TARGETS)
        assert all(lin.weight_fp8.dtype == torch.float8_e4m3fn for _, lin in converted)
        assert not hasattr(dit.transformer_blocks[0].img_mod[1], "weight_fp8")  # modulation stays exact by default
        assert {k: v.dtype for k, v in dit.state_dict().items()} == keys  # FP8 copies are not checkpoint content
        lossy = dit(latents, sigma, text, mask)
        rel = ((lossy - exact).norm() / exact.norm()).item()
        assert 1e-5 < rel < 0.05
        dit.disable_speed()
        assert torch.equal(dit(latents, sigma, text, mask), exact)  # bf16 copies kept: restored exactly

        bytes_before = sum(p.numel() * p.element_size() for p in dit.parameters())
        dit.enable_speed("fp8", compile=False, fp8_keep_bf16=False)
        assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert sum(p.numel() * p.element_size() for p in dit.parameters()) < 0.6 * bytes_before
        assert torch.equal(dit(latents, sigma, text, mask), lossy)
        dit.disable_speed()  # dequantizes: close to, not equal to, the original weights
        assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
        rel = ((dit(latents, sigma, text, mask) - exact).norm() / exact.norm()).item()
        assert 0 < rel < 0.05


# ----------------------------------------------------------------------------------------------------------------------
# Step cache


def _sample(dit: QwenImageDiT, steps: int = 8) -> torch.Tensor:
    """A small Euler loop with a CFG-like padded batch of 2 (one forward per step, as in the pipeline)."""
    latents, _, text, mask = _padded_batch()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = latents
    for i in range(steps):
        v = dit(x, sigmas[i].expand(2), text, mask)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_step_cache_off_is_exact(dit) -> None:
    with torch.no_grad():
        expected = _sample(dit)
        dit.block_evaluations = 0
        cache = speed.enable_step_cache(dit, threshold=0.0)
        got = _sample(dit)
    assert torch.equal(got, expected)
    assert cache.stats()["skipped"] == 0 and dit.block_evaluations == 8 * PARAMS.num_layers


@pytest.mark.parametrize(("max_skips", "full_steps"), [(None, 2), (2, 4)])
def test_step_cache_skips_the_stated_blocks(dit, max_skips, full_steps) -> None:
    n = PARAMS.num_layers
    with torch.no_grad():
        exact = _sample(dit)
        cache = speed.enable_step_cache(dit, threshold=1e9, warmup_steps=2, max_skips=max_skips, head_blocks=1)
        dit.block_evaluations = 0
        first = _sample(dit)
        # 2 warm-up steps in full; then every step skips blocks 1..n-1 except when max_skips forces a full one:
        # max_skips=2 over steps 3..8 gives skip, skip, full, skip, skip, full.
        assert cache.stats()["steps"] == 8 and cache.stats()["skipped"] == 8 - full_steps
        assert dit.block_evaluations == full_steps * n + (8 - full_steps) * 1
        assert (first - exact).abs().max().item() > 1e-4  # skipping really changes the result
        # A second generation (sigma back at 1) starts clean and repeats the first exactly.
        again = _sample(dit)
    assert torch.equal(again, first)
    assert cache.stats()["total_steps"] == 16


def test_step_cache_threshold_is_the_quality_knob(dit) -> None:
    results = {}
    with torch.no_grad():
        exact = _sample(dit)
        for threshold in (0.0, 0.05, 0.5, 1e9):
            cache = speed.enable_step_cache(dit, threshold=threshold, max_skips=None)
            out = _sample(dit)
            results[threshold] = (cache.stats()["skipped"], ((out - exact).norm() / exact.norm()).item())
    skipped = [results[t][0] for t in sorted(results)]
    assert skipped == sorted(skipped) and skipped[0] == 0 and skipped[-1] == 6  # more threshold, more skips
    assert results[0.0][1] == 0.0 and results[1e9][1] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Profiles, pipeline and CLI


def test_profiles_resolve() -> None:
    cpu = torch.device("cpu")
    assert speed.resolve_profile("auto", cpu) == speed.SpeedConfig()  # nothing pays on CPU
    assert speed.resolve_profile("exact", cpu).compile == bool(shutil.which("gcc") or shutil.which("cc"))
    cache = speed.resolve_profile("cache", cpu, compile=False)
    assert cache.step_cache == speed.DEFAULT_CACHE_THRESHOLD and not cache.exact
    assert speed.resolve_profile("exact", cpu).exact and not speed.resolve_profile("fp8", cpu).exact
    exact, fastest = speed.resolve_profile("exact", cpu), speed.resolve_profile("fastest", cpu)
    assert exact.fused_gelu and exact.fused_qk and fastest.fused_gelu and fastest.fused_qk
    # Fused norms: in the bf16 profiles (not FP8's, which fuses its quantization with the norms), and off CUDA only
    # when asked for by name.
    assert speed.PROFILES["exact"]["fused_norm"] and speed.PROFILES["cache"]["fused_norm"]
    assert not speed.PROFILES["fp8"]["fused_norm"] and not speed.PROFILES["fastest"]["fused_norm"]
    assert not exact.fused_norm and speed.resolve_profile("exact", cpu, fused_norm=True).fused_norm
    # CUDA graphs: in the profiles without the step cache, dropped off CUDA; never with the cache.
    assert speed.PROFILES["exact"]["cuda_graph"] and speed.PROFILES["fp8"]["cuda_graph"]
    assert not exact.cuda_graph and not speed.resolve_profile("exact", cpu, cuda_graph=True).cuda_graph
    assert not speed.PROFILES["cache"]["cuda_graph"] and not fastest.cuda_graph
    assert exact.modulation_tables and not fastest.modulation_tables  # FP8 ran slower with them (benchmarks.md)
    with pytest.raises(InputError, match=r"cuda_graph=True cannot go with step_cache=0\.2"):
        speed.SpeedConfig(cuda_graph=True, step_cache=0.2)
    with pytest.raises(InputError, match="Unknown speed profile 'turbo'"):
        speed.resolve_profile("turbo", cpu)
    with pytest.raises(InputError, match="Unknown speed option"):
        speed.resolve_profile("exact", cpu, warp=9)
    with pytest.raises(InputError, match="step_cache"):
        speed.SpeedConfig(step_cache=-1.0)


def test_pipeline_enable_speed(models_dir) -> None:
    import imagezoo

    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    kwargs = {"seed": 3, "num_inference_steps": 4, "output_type": "latent", "progress_bar_cmd": lambda x: x}
    expected = pipe(["a red bicycle", "a cat"], negative_prompt=" ", **kwargs)
    (state,) = pipe.enable_speed("cache", compile=False, step_cache=0.0)
    assert torch.equal(pipe(["a red bicycle", "a cat"], negative_prompt=" ", **kwargs), expected)
    assert state.cache.stats() == {"steps": 4, "skipped": 0, "total_steps": 4, "total_skipped": 0}
    pipe.disable_speed()
    assert pipe.components.modules["dit"]._speed_state is None


def test_cli_speed_flag(models_dir, tmp_path, capsys) -> None:
    from imagezoo.cli import main

    base = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "2", "--device", "cpu"]
    base += ["--local-model-path", str(models_dir), "--height", "64", "--width", "64"]
    assert main([*base, "--speed", "auto", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main([*base, "--speed", "turbo", "--out", str(tmp_path / "b.png")]) == 2
    assert "Unknown speed profile 'turbo'" in capsys.readouterr().err
