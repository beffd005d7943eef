"""Fixtures for the memory-strategy tests: a private tiny pipeline (strategies mutate it) and its plain outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import imagezoo
from imagezoo.memory import module_slots

CALL = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 2,
    "seed": 1,
    "output_type": "latent",
    "progress_bar_cmd": lambda steps: steps,
}
"""CFG is on (the tiny model's default cfg 4): each DiT forward runs a batch of two."""


def run(pipe, prompt: str = "a cat", **overrides) -> torch.Tensor:
    """Output (final latents unless overridden) of a short seeded generation; `overrides` replace `CALL` entries."""
    return pipe(prompt, **{**CALL, **overrides})


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every component, by `component.name` (live tensors, not copies)."""
    out = {}
    for component, module in pipe.components.modules.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            out[f"{component}.{name}"] = tensor
    return out


def hook_counts(pipe) -> dict[str, int]:
    """Number of forward hooks on every submodule (a removed strategy must leave none behind)."""
    counts = {}
    for component, module in pipe.components.modules.items():
        for name, sub in module.named_modules():
            counts[f"{component}.{name}"] = len(sub._forward_pre_hooks) + len(sub._forward_hooks)
    return counts


def align_weights(pipe) -> None:
    """Give every weight a fresh (aligned) allocation, values unchanged.

    CPU matrix-vector products (a batch of one, e.g. a CFG half's modulation) round differently with the weight's
    address alignment. Tensors read from the files sit at arbitrary offsets; placement strategies pack them aligned.
    """
    for module in pipe.components.modules.values():
        for _, slot in module_slots(module):
            slot.set(slot.get().clone())


@contextlib.contextmanager
def split(pipe) -> Iterator[None]:
    """The DiT runs as under a placement strategy: every batch sample by sample, block by block, and each step's
    modulation computed by its forward (a strategy hooks the blocks, which rules out the loop's modulation tables)."""
    dit = pipe.components.modules["dit"]
    previous = dit.memory_split_batches(True)
    dit.modulation_tables = False
    try:
        yield
    finally:
        dit.memory_split_batches(previous)
        dit.modulation_tables = True


@pytest.fixture(scope="session")
def split_batches():
    """`with split_batches(pipe):` the DiT runs batches sample by sample (see `split`)."""
    return split


@pytest.fixture(scope="session")
def generate():
    """`generate(pipe, prompt="a cat", **overrides)`: a short seeded generation (see `run`)."""
    return run


@pytest.fixture(scope="module")
def pipe(models_dir) -> Iterator:
    """A tiny float32 CPU pipeline of this module's own; each test must leave it with no strategy applied."""
    pipeline = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    align_weights(pipeline)
    yield pipeline
    pipeline.disable_memory()


@pytest.fixture(scope="module")
def reference(pipe) -> torch.Tensor:
    """The plain model's latents, its CFG batches run sample by sample as placement strategies run them: the same
    ops, so a placement strategy must give these bits exactly."""
    with split(pipe):
        return run(pipe)


@pytest.fixture(scope="module")
def batched_reference(pipe) -> torch.Tensor:
    """The plain run's latents, CFG as one DiT batch of two (differs from `reference` by float rounding only)."""
    return run(pipe)


@pytest.fixture(scope="module")
def original(pipe) -> dict[str, torch.Tensor]:
    """Copies of the plain model's tensors."""
    return {name: tensor.detach().clone() for name, tensor in weights(pipe).items()}


@pytest.fixture
def clean(pipe, original) -> Iterator:
    """The pipeline, checked afterwards to be back to the plain model whatever the test did."""
    hooks = hook_counts(pipe)
    parameters = {name: id(t) for name, t in pipe.components.modules["dit"].named_parameters()}
    yield pipe
    pipe.disable_memory()
    restored = weights(pipe)
    assert set(restored) == set(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and restored[name].device == tensor.device, name
        assert torch.equal(restored[name], tensor), name
    assert hook_counts(pipe) == hooks
    # nn.Parameter objects are kept (optimizers, LoRA managers and user code may hold them).
    assert {name: id(t) for name, t in pipe.components.modules["dit"].named_parameters()} == parameters
