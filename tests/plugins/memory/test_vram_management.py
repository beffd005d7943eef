"""The seed's API: per-component `offload_device` / `offload_dtype` plus `pipe.enable_vram_management(...)`."""

from __future__ import annotations

import pytest
import torch

from imagezoo import ModelConfig
from imagezoo.errors import InputError
from imagezoo.plugins.qwen_image import QwenImagePipeline

FOLDERS = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}


def _load(tiny_root, **per_component):
    configs = [ModelConfig(path=tiny_root / folder, **per_component.get(name, {})) for name, folder in FOLDERS.items()]
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=configs,
        tokenizer_config=ModelConfig(path=tiny_root / "tokenizer"),
    )


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in pipe.components.modules.items() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_fp8_and_offload_per_component_at_minimum_vram(tiny_root, reference, generate):
    fp8_cpu = {"offload_device": "cpu", "offload_dtype": torch.float8_e4m3fn}
    pipe = _load(tiny_root, dit=fp8_cpu, text_encoder=fp8_cpu, vae={"offload_device": "cpu"})
    plain = _state(pipe)
    pipe.enable_vram_management(vram_limit=0)
    fp8, stream = pipe.memory_strategies
    assert (fp8.name, stream.name) == ("fp8", "stream")
    assert fp8.components == ["dit", "text_encoder"] and not fp8.keep_original  # originals re-read from the files
    assert all(b.streamed for b in stream._components["dit"].blocks)
    assert 0 < ((generate(pipe) - reference).norm() / reference.norm()).item() < 0.01
    pipe.disable_memory()
    assert _same(_state(pipe), plain)


def test_offload_device_only_is_exact(tiny_root, reference, generate):
    cpu = {"offload_device": "cpu"}
    pipe = _load(tiny_root, dit=cpu, text_encoder=cpu, vae=cpu)
    pipe.enable_vram_management(vram_limit=0, num_persistent_param_in_dit=10**9)
    assert [s.name for s in pipe.memory_strategies] == ["stream"]
    assert torch.equal(generate(pipe), reference)


def test_disk_offload_device_streams_from_the_files(tiny_root, reference, generate):
    pipe = _load(tiny_root, dit={"offload_device": "disk"})
    pipe.enable_vram_management()
    (stream,) = pipe.memory_strategies
    assert stream.sources == {"dit": "disk"} and stream.components == ["dit"]
    weight = pipe.components.modules["dit"].transformer_blocks[0].attn.to_q.weight
    assert weight.untyped_storage().nbytes() <= weight.element_size()  # a placeholder between uses
    assert torch.equal(generate(pipe), reference)


def test_registry_pipeline_manages_every_component(clean, reference, generate):
    clean.enable_vram_management(vram_limit=0)
    (stream,) = clean.memory_strategies
    assert sorted(stream._components) == ["dit", "text_encoder", "vae"]
    assert torch.equal(generate(clean), reference)


def test_bad_offload_device_names_the_value(tiny_root):
    pipe = _load(tiny_root, dit={"offload_device": "tape"})
    with pytest.raises(InputError, match="offload_device='tape' of the dit is not allowed; use 'cpu' or 'disk'"):
        pipe.enable_vram_management()
    assert pipe.memory_strategies == []
