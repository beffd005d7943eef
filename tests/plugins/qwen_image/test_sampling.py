"""`QwenImageDiT.sampling`: a loop's modulation tables (CPU) and CUDA graphs (CUDA) give the forward's results."""

from __future__ import annotations

import pytest
import torch

from imagezoo.plugins.qwen_image.dit import DiTParams, QwenImageDiT

TOL = 1e-5  # float32: table rows come from one GEMM over all sigmas, a lone forward's from a GEMV
PARAMS = DiTParams(num_layers=3, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
SIGMAS = (1.0, 0.8, 0.55, 0.3)


@pytest.fixture()
def dit(seeded_dit) -> QwenImageDiT:
    return seeded_dit(PARAMS)


def _cfg_batch(device: str = "cpu", dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 8, 12, generator=gen).to(device, dtype)
    text = torch.randn(2, 7, PARAMS.text_dim, generator=gen).to(device, dtype)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    return latents, text, mask


def _count_modulation_calls(dit: QwenImageDiT) -> list[int]:
    """Rows that went through each block's image modulation linear, appended per call."""
    rows: list[int] = []
    for block in dit.transformer_blocks:
        block.img_mod[1].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows


def _loop(dit: QwenImageDiT, latents, text, mask, sigmas=SIGMAS, dtype=torch.float32) -> list[torch.Tensor]:
    outs = []
    for sigma in sigmas:
        sigma_batch = torch.full((latents.shape[0],), sigma, device=latents.device, dtype=dtype)
        outs.append(dit(latents, sigma_batch, text, mask))
    return outs


@torch.no_grad()
def test_modulation_tables_give_the_plain_forward(dit) -> None:
    latents, text, mask = _cfg_batch()
    expected = _loop(dit, latents, text, mask)
    rows = _count_modulation_calls(dit)
    with dit.sampling(SIGMAS):
        got = _loop(dit, latents, text, mask)
        got_single = _loop(dit, latents[:1], text[:1], None, sigmas=SIGMAS[1:2])[0]
    # One call per block for the whole loop, with every sigma as a row; not one per forward.
    assert rows == [len(SIGMAS)] * PARAMS.num_layers
    for out, ref in zip(got, expected, strict=True):
        assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()
    single_ref = _loop(dit, latents[:1], text[:1], None, sigmas=SIGMAS[1:2])[0]
    assert (got_single - single_ref).abs().max().item() <= TOL * single_ref.abs().max().item()
    assert dit._sampling is None  # the scope ends with the block


@torch.no_grad()
def test_sigmas_outside_the_loop_compute_as_usual(dit) -> None:
    latents, text, mask = _cfg_batch()
    rows = _count_modulation_calls(dit)
    with dit.sampling(SIGMAS):
        off_schedule = dit(latents, torch.full((2,), 0.42), text, mask)
        mixed = dit(latents, torch.tensor([1.0, 0.8]), text, mask)  # samples at different steps
    assert rows == [2] * PARAMS.num_layers * 2  # both forwards computed their own modulation
    assert torch.equal(off_schedule, dit(latents, torch.full((2,), 0.42), text, mask))
    assert torch.equal(mixed, dit(latents, torch.tensor([1.0, 0.8]), text, mask))


@torch.no_grad()
def test_tables_follow_the_sigma_dtype_and_skip_hooked_blocks(dit) -> None:
    latents, text, mask = _cfg_batch()
    # bf16 sigmas that round alike share a row; the table is computed from the rounded values, as the forward is.
    sigmas = (0.9990, 0.9985, 0.5)
    expected = _loop(dit, latents, text, mask, sigmas, torch.bfloat16)
    with dit.sampling(sigmas):
        got = _loop(dit, latents, text, mask, sigmas, torch.bfloat16)
        assert dit._sampling.tables.row(torch.tensor([0.9985], dtype=torch.bfloat16)) == 0
    for out, ref in zip(got, expected, strict=True):
        assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()
    # A memory strategy that hooks the blocks may only bring their weights in when a block is called: no tables.
    dit.transformer_blocks[1].register_forward_pre_hook(lambda module, args: None)
    rows = _count_modulation_calls(dit)
    with dit.sampling(SIGMAS):
        _loop(dit, latents, text, mask, SIGMAS[:2])
    assert rows == [2] * PARAMS.num_layers * 2


def test_pipeline_runs_its_loop_inside_sampling(models_dir) -> None:
    import imagezoo

    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    dit = pipe.denoiser.dit
    kwargs = {"seed": 3, "num_inference_steps": 5, "output_type": "latent", "progress_bar_cmd": lambda x: x}
    dit.modulation_tables = False
    expected = pipe("a red bicycle", negative_prompt=" ", **kwargs)
    dit.modulation_tables = True
    rows = _count_modulation_calls(dit)
    got = pipe("a red bicycle", negative_prompt=" ", **kwargs)
    assert rows == [5] * len(dit.transformer_blocks)  # the 5 steps' sigmas, once per block
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_cuda_graph_replays_the_forward(seeded_dit) -> None:
    dit = seeded_dit(PARAMS).to("cuda", torch.bfloat16)
    latents, text, mask = _cfg_batch("cuda", torch.bfloat16)
    sigmas = (*SIGMAS, 0.2, 0.1)
    with dit.sampling(sigmas):
        expected = _loop(dit, latents, text, mask, sigmas, torch.bfloat16)
    dit.enable_speed("off", cuda_graph=True)
    with dit.sampling(sigmas):
        got = _loop(dit, latents, text, mask, sigmas, torch.bfloat16)
        graphs = dit._sampling.graphs
        # The first forward warms up, the second runs while the graph is recorded, the others replay it.
        assert (graphs.captures, graphs.replays) == (1, len(sigmas) - 2)
        # Another layout (batch 1, no mask) warms up and is captured on its own.
        single = _loop(dit, latents[:1], text[:1], None, sigmas[:3], torch.bfloat16)
        assert (graphs.captures, graphs.replays) == (2, len(sigmas) - 1)
    single_ref = _loop(dit, latents[:1], text[:1], None, sigmas[:3], torch.bfloat16)
    for out, ref in zip(got + single, expected + single_ref, strict=True):
        assert torch.equal(out, ref)  # the same kernels on the same inputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_replayed_steps_with_host_sigmas_never_wait_for_the_gpu(seeded_dit) -> None:
    dit = seeded_dit(PARAMS).to("cuda", torch.bfloat16)
    latents, text, mask = _cfg_batch("cuda", torch.bfloat16)
    dit.enable_speed("off", cuda_graph=True)
    with dit.sampling(SIGMAS):
        expected = _loop(dit, latents, text, mask, SIGMAS, torch.bfloat16)
    with dit.sampling(SIGMAS):
        got = []
        for step, sigma in enumerate(SIGMAS):
            # As the pipeline passes it: on the CPU. From the third step (replays), any host read of a GPU value
            # (which waits for the queued kernels) raises.
            torch.cuda.set_sync_debug_mode("error" if step >= 2 else "default")
            try:
                got.append(dit(latents, torch.full((2,), sigma, dtype=torch.bfloat16), text, mask))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert dit._sampling.graphs.replays == len(SIGMAS) - 2
    for out, ref in zip(got, expected, strict=True):
        assert torch.equal(out, ref)


def test_sigma_placement_keeps_shape_and_dtype() -> None:
    from imagezoo.plugins.qwen_image.dit import _sigma_on

    meta = torch.device("meta")  # stands in for a GPU (no values: placement, shape and dtype are what is checked)
    uniform = _sigma_on(torch.full((2,), 0.5, dtype=torch.bfloat16), meta)
    assert (uniform.device, uniform.shape, uniform.dtype) == (meta, (2,), torch.bfloat16)
    mixed = _sigma_on(torch.tensor([1.0, 0.8]), meta)
    assert (mixed.device, mixed.shape) == (meta, (2,))
    on_cpu = torch.tensor([0.3])
    assert _sigma_on(on_cpu, torch.device("cpu")) is on_cpu


def test_pipeline_gives_sampling_denoisers_host_sigmas(models_dir) -> None:
    import imagezoo

    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    meta = torch.device("meta")
    assert pipe._sigma_tensor(2, 0.5, meta).device.type == "cpu"  # the Qwen denoiser has `sampling`
    pipe.denoiser.sampling = None  # a denoiser without it gets sigma where the latents are
    assert pipe._sigma_tensor(2, 0.5, meta).device == meta
