"""Streaming with per-sample batches: one load per streamed block per forward through two fixed buffers, the
resident blocks re-planned for the DiT's estimated activations under a `vram_limit`, exact outputs and removal."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from imagezoo.memory import GIB
from imagezoo.plugins.memory.offload import Offload
from imagezoo.plugins.memory.stream import Stream
from imagezoo.plugins.qwen_image.dit import DiTParams, QwenImageDiT

PARAMS = DiTParams(num_layers=8, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
SMALL, LARGE = (8, 12), (32, 32)  # latent pixels: 24 and 256 image tokens
LENGTHS = (7, 4)  # a CFG-like batch of two right-padded prompts


@pytest.fixture()
def dit(seeded_dit) -> QwenImageDiT:
    return seeded_dit(PARAMS)


def _pipeline(dit: QwenImageDiT) -> SimpleNamespace:
    """What a placement strategy reads of a pipeline, holding only the DiT."""
    return SimpleNamespace(components=SimpleNamespace(modules={"dit": dit}), device="cpu", files={})


def _inputs(size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(size[0] * 100 + size[1])
    latents = torch.randn(2, 16, *size, generator=gen)
    sigma = torch.rand(2, generator=gen)
    text = torch.randn(2, max(LENGTHS), PARAMS.text_dim, generator=gen)
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    return latents, sigma, text, mask


def _split_output(dit: QwenImageDiT, size: tuple[int, int]) -> torch.Tensor:
    """The plain DiT's output, run sample by sample (the same ops placement strategies run)."""
    previous = dit.memory_split_batches(True)
    try:
        with torch.no_grad():
            return dit(*_inputs(size))
    finally:
        dit.memory_split_batches(previous)


def _estimate(dit: QwenImageDiT, size: tuple[int, int]) -> int:
    previous = dit.memory_split_batches(True)
    try:
        with torch.no_grad():
            return dit.memory_activation_bytes(*_inputs(size))
    finally:
        dit.memory_split_batches(previous)


def _sizes(dit: QwenImageDiT) -> tuple[int, int]:
    """Packed bytes of the DiT's rest unit and of one block (all blocks are the same size)."""
    pipe = _pipeline(dit)
    strategy = Stream()
    strategy.apply(pipe)
    comp = strategy._components["dit"]
    sizes = comp.rest.nbytes, comp.blocks[0].nbytes
    assert len({b.nbytes for b in comp.blocks}) == 1
    strategy.remove(pipe)
    return sizes


def _stream(dit: QwenImageDiT, budget: int, **options) -> Stream:
    strategy = Stream(vram_limit=budget / GIB, vram_buffer=0, **options)
    strategy.apply(_pipeline(dit))
    return strategy


def _forward(dit: QwenImageDiT, strategy: Stream, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """The DiT's output under the strategy and the streamed-block loads it took."""
    before = strategy.stats["streamed_loads"]
    with torch.no_grad():
        out = dit(*_inputs(size))
    return out, strategy.stats["streamed_loads"] - before


@pytest.mark.parametrize("prefetch", [True, False])
def test_each_streamed_block_is_loaded_once_per_forward_of_a_batch(dit, prefetch) -> None:
    expected = _split_output(dit, SMALL)
    rest, block = _sizes(dit)
    # Room for the rest, the two streaming buffers, three resident blocks and the activations.
    strategy = _stream(dit, rest + 5 * block + _estimate(dit, SMALL), prefetch=prefetch)
    comp = strategy._components["dit"]
    streamed = [b for b in comp.blocks if b.streamed]
    assert len(streamed) == 5
    on_device = []

    def record(module, args):  # runs after the strategy's hook has loaded the block
        on_device.append(sum(b.flat is not None or b.pending is not None for b in streamed))

    handles = [b.register_forward_pre_hook(record) for b in dit.transformer_blocks]
    try:
        for _ in range(2):  # the second forward starts from what the first left
            out, loads = _forward(dit, strategy, SMALL)
            assert torch.equal(out, expected)
            assert loads == len(streamed)  # not once per sample
            # Afterwards no block computes from a streaming buffer; at most the next call's first is prefetched.
            assert all(b.flat is None for b in streamed)
            assert sum(b.pending is not None for b in streamed) <= (1 if prefetch else 0)
    finally:
        for handle in handles:
            handle.remove()
        strategy.remove(_pipeline(dit))
    assert len(on_device) == 2 * 2 * PARAMS.num_layers
    assert max(on_device) <= 2  # the computing block and the prefetched one
    assert strategy.stats["peak_device_bytes"] <= rest + 5 * block
    assert not dit.split_batches


def test_resident_blocks_are_replanned_for_the_activations_of_each_resolution(dit, caplog) -> None:
    expected = {size: _split_output(dit, size) for size in (SMALL, LARGE)}
    rest, block = _sizes(dit)
    assert _estimate(dit, LARGE) - _estimate(dit, SMALL) > 2 * block  # the larger size needs two blocks' room more
    strategy = _stream(dit, rest + 6 * block + _estimate(dit, SMALL))
    comp = strategy._components["dit"]
    streamed = {}
    try:
        with caplog.at_level(logging.INFO, logger="imagezoo.plugins.memory._placement"):
            for size in (SMALL, LARGE, SMALL, LARGE):
                out, loads = _forward(dit, strategy, size)
                assert torch.equal(out, expected[size])
                streamed[size] = [b.streamed for b in comp.blocks]
                assert loads == sum(streamed[size])
                assert comp.activation_bytes == _estimate(dit, size)
                assert all(b.flat is not None for b in comp.blocks if not b.streamed)  # resident ones loaded
                assert strategy.stats["device_bytes"] <= strategy.budget - comp.activation_bytes
    finally:
        strategy.remove(_pipeline(dit))
    assert sum(streamed[SMALL]) == 4
    assert sum(streamed[LARGE]) > sum(streamed[SMALL])
    assert sum("re-planned" in r.getMessage() for r in caplog.records) >= 3  # small (first), large, small, large


def test_without_a_vram_limit_activations_change_nothing(dit) -> None:
    expected = _split_output(dit, LARGE)
    strategy = Offload()
    strategy.apply(_pipeline(dit))
    try:
        out, loads = _forward(dit, strategy, LARGE)
        comp = strategy._components["dit"]
        assert torch.equal(out, expected)
        assert loads == 0 and comp.activation_bytes == 0 and not any(b.streamed for b in comp.blocks)
    finally:
        strategy.remove(_pipeline(dit))


@pytest.mark.parametrize("split_before", [False, True])
def test_removal_restores_split_batches_and_every_weight(dit, split_before) -> None:
    dit.split_batches = split_before
    original = {name: t.detach().clone() for name, t in [*dit.named_parameters(), *dit.named_buffers()]}
    parameters = {name: id(p) for name, p in dit.named_parameters()}
    rest, block = _sizes(dit)
    strategy = _stream(dit, rest + 4 * block)
    assert dit.split_batches is True
    _forward(dit, strategy, LARGE)
    strategy.remove(_pipeline(dit))
    assert dit.split_batches is split_before
    restored = dict([*dit.named_parameters(), *dit.named_buffers()])
    assert {name: id(p) for name, p in dit.named_parameters()} == parameters
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    assert not dit._forward_pre_hooks and not dit._forward_hooks
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in dit.transformer_blocks)


def test_pipeline_cfg_streams_each_dit_block_once_per_step(clean, reference, generate) -> None:
    clean.enable_memory(["stream"], vram_limit=0, components=["dit"])
    strategy = clean.memory_strategies[0]
    n_blocks = len(clean.components.modules["dit"].transformer_blocks)
    before = strategy.stats["streamed_loads"]
    assert torch.equal(generate(clean), reference)  # CFG: the DiT runs the two halves sample by sample
    assert strategy.stats["streamed_loads"] - before == 2 * n_blocks  # 2 steps, each block once per step


def test_pipeline_without_cfg_equals_the_plain_run(clean, generate, split_batches) -> None:
    with split_batches(clean):  # one sample: nothing to split, but the modulation computed per step, as streamed
        plain = generate(clean, cfg_scale=1.0)
    clean.enable_memory(["stream"], vram_limit=0)
    assert torch.equal(generate(clean, cfg_scale=1.0), plain)  # one sample: nothing to split


def test_pipeline_cfg_split_equals_the_batched_run_up_to_rounding(reference, batched_reference) -> None:
    # `reference` runs the CFG pair sample by sample (as placement strategies do): products of another batch size.
    assert ((reference - batched_reference).norm() / batched_reference.norm()).item() < 1e-5


@pytest.mark.parametrize(("vram_limit", "dit_stays"), [(3.0, True), (2.2, False)])
def test_a_component_without_an_activation_estimate_gets_room_before_it_runs(
    clean, generate, vram_limit, dit_stays
) -> None:
    # The VAE declares no estimate: under a limit it is given 2 GiB of room, so with a budget of 1.7 GiB
    # (2.2 - 0.5 buffer) the DiT leaves the device before the decode, and with 2.5 GiB it stays.
    clean.enable_memory(["stream"], vram_limit=vram_limit, vram_buffer=0.5)
    strategy = clean.memory_strategies[0]
    generate(clean, cfg_scale=1.0, output_type="np")
    assert strategy._components["vae"].active
    assert strategy._components["dit"].active is dit_stays
