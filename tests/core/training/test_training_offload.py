"""Block streaming of frozen weights (`--offload_frozen_blocks`): same gradients as resident weights, at most two
streamed blocks on the device, weights at home between uses, compiled blocks, exact removal, and the trainer's use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from imagezoo.errors import ConfigError, InputError
from imagezoo.plugins.qwen_image.dit import TINY_DIT, QwenImageBlock, QwenImageDiT
from imagezoo.training import make_config
from imagezoo.training.config import DEFAULT_LORA_TARGETS
from imagezoo.training.lora import inject_lora
from imagezoo.training.offload import BlockStreamer, streamed_indices
from imagezoo.training.trainer import Trainer

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def _dit(layers: int, device: str = "cpu") -> QwenImageDiT:
    """A seeded tiny DiT with `layers` blocks, LoRA (B non-zero, so A gets gradients) and gradient checkpointing."""
    torch.manual_seed(0)
    dit = QwenImageDiT(replace(TINY_DIT, num_layers=layers)).requires_grad_(False)
    inject_lora(dit, DEFAULT_LORA_TARGETS.split(","), 4)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    dit.enable_gradient_checkpointing()
    return dit.to(device).train()


def _steps(dit: QwenImageDiT, steps: int = 2, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """LoRA gradients of `steps` forward/backward passes on fixed random inputs (batch 2, padded text)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        latents = torch.randn(2, 16, 8, 8, generator=generator).to(device)
        text = torch.randn(2, 5, 32, generator=generator).to(device)
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2], device=device)
        dit.zero_grad(set_to_none=True)
        dit(latents, torch.tensor([0.3, 0.7], device=device), text, mask).square().mean().backward()
        out.append({n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None})
    return out


def _assert_same(
    got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]], *, gpu: bool = False
) -> None:
    assert len(got) == len(expected)
    # On a GPU the attention backward accumulates with atomics: two identical runs differ in the last bits.
    rtol, atol = (1e-4, 1e-6) if gpu else (1e-6, 1e-7)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and len(a) > 0
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol)


class _HostReads(TorchDispatchMode):
    """Records every op except the loading copy that reads a streamer's host buffers.

    On a GPU such an op fails (a CPU tensor in a CUDA kernel); on the CPU it would silently compute with the right
    values, so this is how the CPU tests see a weight used while its block is not loaded.
    """

    def __init__(self, homes: set[int]) -> None:
        super().__init__()
        self.homes = homes
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.aten.copy_.default:
            for value in tree_leaves((args, kwargs)):
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self.homes:
                    self.reads.append(str(func))
        return func(*args, **kwargs)


def test_streamed_blocks_are_evenly_spaced():
    assert streamed_indices(60, 12) == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47, 52, 57]
    assert streamed_indices(4, 2) == [1, 3]
    assert streamed_indices(5, 1) == [2]
    assert streamed_indices(4, -1) == streamed_indices(4, 9) == [0, 1, 2, 3]
    assert streamed_indices(4, 0) == []
    with pytest.raises(InputError, match=r"count=-2 must be -1 \(all blocks\) or an int >= 0"):
        streamed_indices(4, -2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("count", "indices"), [(-1, [0, 1, 2, 3, 4, 5]), (3, [1, 3, 5]), (1, [3])])
def test_streaming_keeps_the_gradients_and_computes_with_loaded_weights_only(count, indices, device):
    expected = _steps(_dit(6, device), 3, device)
    dit = _dit(6, device)
    streamer = BlockStreamer(dit.transformer_blocks, count, device)
    assert streamer.indices == indices
    frozen = [p for i in indices for p in dit.transformer_blocks[i].parameters() if not p.requires_grad]
    if device == "cuda":
        assert all(p.device.type == "cpu" and p.is_pinned() for p in frozen)
    reads = _HostReads({p.untyped_storage().data_ptr() for p in frozen})  # right after packing: their homes
    if device == "cpu":
        with reads:
            got = _steps(dit, 3, device)
    else:
        got = _steps(dit, 3, device)
    _assert_same(got, expected)
    assert reads.reads == []
    stats = streamer.stats
    assert stats["loads"] >= len(indices) and stats["bytes_streamed"] > 0
    assert 1 <= stats["max_loaded"] <= 2
    # Forward's last streamed block is backward's first, and backward's last the next forward's first: only the
    # first use of the run waits for a copy; every other one finds its block prefetched or still loaded.
    assert stats["sync_loads"] == 1
    if len(indices) > 1:
        assert stats["prefetch_hits"] > 0
    streamer.remove()


def test_streamed_weights_stay_at_home_between_uses():
    dit = _dit(6)
    blocks = list(dit.transformer_blocks)
    trainable = {id(p): p.data_ptr() for p in dit.parameters() if p.requires_grad}
    streamer = BlockStreamer(blocks, 3, "cpu")
    assert {id(p): p.data_ptr() for p in dit.parameters() if p.requires_grad} == trainable  # LoRA stays put
    frozen = {i: [p for p in blocks[i].parameters() if not p.requires_grad] for i in streamer.indices}
    home = {id(p): p.data_ptr() for params in frozen.values() for p in params}
    seen = []

    def check(block, args):
        current = blocks.index(block)
        loaded = streamer.loaded
        assert len(loaded) <= 2
        for i, params in frozen.items():
            at_home = [p.data_ptr() == home[id(p)] for p in params]
            if i == current:
                assert not any(at_home), f"block {i} runs with weights at home"
            elif i not in loaded:
                assert all(at_home), f"block {i} is not loaded but its weights left home"
        seen.append(current)

    for block in blocks:
        block.register_forward_pre_hook(check)
    _steps(dit, 2)
    # Every block ran in forward and in backward's recomputation, each pass in its order.
    assert seen == [*range(6), *range(5, -1, -1)] * 2
    streamer.remove()


def test_remove_restores_every_tensor_and_class():
    dit = _dit(4)
    original = {n: t.clone() for n, t in [*dit.named_parameters(), *dit.named_buffers()]}
    params = dict(dit.named_parameters())
    streamer = BlockStreamer(dit.transformer_blocks, 2, "cpu")
    assert all(type(b) is not QwenImageBlock and isinstance(b, QwenImageBlock) for b in dit.transformer_blocks)
    assert len({type(b) for b in dit.transformer_blocks}) == 1  # one class for all: compiled graphs stay shared
    with pytest.raises(InputError, match=r"Blocks \[0, 1, 2, 3\] are already streamed"):
        BlockStreamer(dit.transformer_blocks, 1, "cpu")
    with torch.no_grad():
        dit(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), torch.randn(1, 5, 32))
    assert streamer.loaded == [1, 3]  # the refused second streamer changed nothing
    streamer.remove()
    assert all(type(b) is QwenImageBlock for b in dit.transformer_blocks)
    assert dict(dit.named_parameters()) == params  # the same Parameter objects
    for name, tensor in [*dit.named_parameters(), *dit.named_buffers()]:
        assert torch.equal(tensor, original[name]), name
        # Own memory again, not views of the (released) host buffers or of a loaded block's buffer.
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
    with torch.no_grad():
        dit(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), torch.randn(1, 5, 32))  # plain blocks run again


@pytest.mark.parametrize("order", ["compile_then_stream", "stream_then_compile"])
def test_compiled_blocks_stream_with_the_same_gradients_and_graphs(order):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    reference = _dit(3)
    resident_counter = CompileCounterWithBackend("aot_eager")
    for block in reference.transformer_blocks:
        block.compile(backend=resident_counter)
    expected = _steps(reference)

    torch._dynamo.reset()
    dit = _dit(3)
    counter = CompileCounterWithBackend("aot_eager")
    if order == "compile_then_stream":
        for block in dit.transformer_blocks:
            block.compile(backend=counter)
    streamer = BlockStreamer(dit.transformer_blocks, 2, "cpu")
    if order == "stream_then_compile":
        for block in dit.transformer_blocks:
            block.compile(backend=counter)
    got = _steps(dit)
    _assert_same(got, expected)
    assert streamer.stats["loads"] > 0
    # Streamed and resident blocks share the compiled graphs: no more of them than without streaming.
    assert 0 < counter.frame_count == resident_counter.frame_count
    streamer.remove()


# ---------------------------------------------------------------------------------------------------------- trainer


@pytest.fixture
def four_block_tiny(fresh_tiny, tiny_with_dit):
    """The tiny pipeline with a seeded 4-block DiT (the embedded one has 2), so some blocks can stay resident."""

    def load():
        base = fresh_tiny()
        torch.manual_seed(0)
        return tiny_with_dit(base, QwenImageDiT(replace(TINY_DIT, num_layers=4)).eval().requires_grad_(False))

    return load


def _train(train_config, data: Path, out: Path, pipe, **settings) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    grads: list[dict[str, torch.Tensor]] = []

    def keep(step, module):
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})

    config = train_config(
        data,
        out,
        **{
            "lora_base_model": "dit",
            "lora_rank": 4,
            "learning_rate": 1e-2,
            "batch_size": 2,
            "max_steps": 3,
            "num_epochs": 2,
            "save_steps": 3,
            "save_training_state": False,
            "use_gradient_checkpointing": True,
            "validation_prompts": ["a red wave"],
            "validation_steps": 2,
            "validation_num_inference_steps": 2,
            "validation_height": 64,
            "validation_width": 64,
            **settings,
        },
    )
    trainer = Trainer(config, pipeline=pipe, grad_callback=keep)
    trainer.run()
    return trainer, grads


@pytest.mark.parametrize(("count", "indices"), [(-1, [0, 1, 2, 3]), (2, [1, 3])])
def test_training_with_streamed_blocks_equals_training_with_resident_ones(
    make_dataset, four_block_tiny, train_config, tmp_path, count, indices
):
    data = make_dataset(4)
    _, expected = _train(train_config, data, tmp_path / "resident", four_block_tiny())
    trainer, grads = _train(train_config, data, tmp_path / "streamed", four_block_tiny(), offload_frozen_blocks=count)
    assert len(grads) == 3
    gpu = trainer.device.type != "cpu"
    _assert_same(grads, expected, gpu=gpu)
    resident = load_file(str(tmp_path / "resident" / "step-3.safetensors"))
    streamed = load_file(str(tmp_path / "streamed" / "step-3.safetensors"))
    assert resident.keys() == streamed.keys() and len(resident) > 0
    for name in resident:
        torch.testing.assert_close(
            streamed[name], resident[name], rtol=1e-4 if gpu else 1e-6, atol=1e-6 if gpu else 1e-7
        )
    # Validation images (before training and at step 2, between training steps) run the streamed blocks too.
    names = sorted(p.name for p in (tmp_path / "streamed" / "validation").iterdir())
    assert names == ["step-0-0.png", "step-2-0.png"]
    for name in names:
        a = np.asarray(Image.open(tmp_path / "streamed" / "validation" / name))
        b = np.asarray(Image.open(tmp_path / "resident" / "validation" / name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, name
    streamer = trainer.streamer
    assert streamer is not None and streamer.indices == indices
    assert streamer.stats["loads"] > 0 and streamer.stats["max_loaded"] <= 2
    streamer.remove()


def test_streaming_needs_gradient_checkpointing():
    base = {"model": "tiny", "dataset_base_path": "d", "lora_base_model": "dit", "offload_frozen_blocks": 12}
    with pytest.raises(ConfigError, match=r"--offload_frozen_blocks 12 needs --use_gradient_checkpointing"):
        make_config(base)
    assert make_config({**base, "use_gradient_checkpointing_offload": True}).offload_frozen_blocks == 12
    # Compiled blocks stream too.
    assert make_config({**base, "use_gradient_checkpointing": True, "compile": True}).compile
