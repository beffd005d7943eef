"""The generation loop on the tiny model: inputs, errors, reproducibility, image-to-image, seed API loading."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import imagezoo
from imagezoo import ModelConfig
from imagezoo.errors import InputError, ModelNotFoundError, NumericalError, UnknownNameError, WeightsError
from imagezoo.plugins.qwen_image import QwenImagePipeline

QUIET = {"progress_bar_cmd": lambda steps: steps}


def _run(pipe, prompt="a cat", **kwargs):
    options = {"height": 64, "width": 64, "num_inference_steps": 2, **QUIET, **kwargs}
    return pipe(prompt, **options)


def test_returns_pil_of_requested_size_and_list_for_batches(tiny_pipe):
    image = _run(tiny_pipe, height=64, width=96, seed=1)
    assert isinstance(image, Image.Image) and image.size == (96, 64)
    images = _run(tiny_pipe, ["a", "b"], seed=1)
    assert isinstance(images, list) and len(images) == 2


def test_seed_reproduces_and_differs(tiny_pipe):
    a = _run(tiny_pipe, seed=3, output_type="latent")
    b = _run(tiny_pipe, seed=3, output_type="latent")
    c = _run(tiny_pipe, seed=4, output_type="latent")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 16, 8, 8) and a.dtype == torch.float32


def test_first_prompt_of_a_seeded_batch_equals_it_alone(tiny_pipe):
    batch = _run(tiny_pipe, ["a cat", "a dog on a hill"], seed=5, output_type="latent", cfg_scale=1.0)
    alone = _run(tiny_pipe, "a cat", seed=5, output_type="latent", cfg_scale=1.0)
    assert torch.max(torch.abs(batch[:1] - alone)).item() <= 1e-5


def test_np_output_range(tiny_pipe):
    array = _run(tiny_pipe, seed=0, output_type="np")
    assert array.shape == (1, 64, 64, 3) and array.min() >= 0.0 and array.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 100}, "height=100 must be a positive multiple of 16"),
        ({"width": 72}, "width=72 must be a positive multiple of 16"),
        ({"denoising_strength": 0.5}, "denoising_strength=0.5 needs an input_image"),
        ({"denoising_strength": 1.5}, r"denoising_strength=1.5 must be in \(0, 1\]"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"cfg_scale": -1.0}, "cfg_scale=-1.0"),
        ({"output_type": "jpeg"}, "output_type='jpeg'"),
        ({"negative_prompt": ["x", "y"]}, "negative_prompt has 2 entries for 1 prompts"),
        ({"latents": torch.zeros(1, 16, 4, 4)}, r"latents have shape \(1, 16, 4, 4\); expected \(1, 16, 8, 8\)"),
        ({"max_sequence_length": 2048}, "2048"),
    ],
)
def test_bad_inputs_name_the_value(tiny_pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        _run(tiny_pipe, **kwargs)


def test_bad_prompt_type(tiny_pipe):
    with pytest.raises(InputError, match="prompt must be a string"):
        _run(tiny_pipe, prompt=[])


def test_unknown_model_and_memory_strategy(models_dir, tiny_pipe):
    with pytest.raises(ModelNotFoundError, match=r"'qwen-imgae'.*Did you mean"):
        imagezoo.load("qwen-imgae", local_model_path=models_dir)
    with pytest.raises(UnknownNameError, match="'bogus'"):
        tiny_pipe.enable_memory(["bogus"])
    assert tiny_pipe.memory_strategies == []


class _FakeDenoiser:
    """Returns a fixed velocity so the loop's arithmetic can be checked exactly."""

    patch_size = 2

    def __init__(self, value: float = 0.0, nan_at_call: int | None = None):
        self.value, self.nan_at_call, self.calls = value, nan_at_call, 0

    def __call__(self, latents, sigma, text):
        self.calls += 1
        out = torch.full_like(latents, self.value)
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            out[..., 0, 0] = float("inf")
        return out


def test_non_finite_latents_stop_with_step_and_cause(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "denoiser", _FakeDenoiser(nan_at_call=2))
    with pytest.raises(NumericalError, match=r"step 2/3.*fp16"):
        _run(tiny_pipe, num_inference_steps=3, seed=0)


def test_euler_loop_and_img2img_mixing_are_exact(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "denoiser", _FakeDenoiser(value=1.0))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _run(tiny_pipe, latents=noise, output_type="latent", cfg_scale=1.0, num_inference_steps=4)
    # v = 1 everywhere: x_final = noise + sum(sigma_next - sigma) = noise - sigma_0 (= 1)
    assert torch.allclose(out, noise - 1.0, atol=1e-6)

    image = Image.new("RGB", (64, 64), (200, 30, 90))
    clean = tiny_pipe.vae.encode(torch.tensor([200, 30, 90]).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1.0)
    sigmas = tiny_pipe.resolve_sampler(None).sigmas(4, 16, 0.5)
    out = _run(
        tiny_pipe,
        latents=noise,
        output_type="latent",
        cfg_scale=1.0,
        num_inference_steps=4,
        input_image=image,
        denoising_strength=0.5,
    )
    expected = sigmas[0] * noise + (1 - sigmas[0]) * clean - sigmas[0]
    assert len(sigmas) == 3 and torch.allclose(out, expected, atol=1e-5)


def test_progress_bar_and_step_callback(tiny_pipe):
    seen, steps = [], []
    _run(
        tiny_pipe,
        num_inference_steps=3,
        seed=0,
        progress_bar_cmd=lambda it: seen.append(len(it)) or it,
        step_callback=lambda i, sigma, x: steps.append((i, sigma, tuple(x.shape))),
    )
    assert seen == [3]
    assert [s[0] for s in steps] == [0, 1, 2] and steps[-1][1] == 0.0


def test_long_prompt_is_truncated_with_both_counts(tiny_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        _run(tiny_pipe, prompt="word " * 50, seed=0, max_sequence_length=10)
    assert any("10" in r.getMessage() and "5" in r.getMessage() for r in caplog.records)


def test_seed_api_from_paths_equals_registry_load(tiny_root, tiny_pipe):
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(path=tiny_root / "transformer"),
            ModelConfig(path=sorted((tiny_root / "text_encoder").glob("model-*.safetensors"))),
            ModelConfig(path=tiny_root / "vae" / "diffusion_pytorch_model.safetensors"),
        ],
        tokenizer_config=ModelConfig(path=tiny_root / "tokenizer"),
    )
    assert pipe.defaults.num_inference_steps == 50  # the family's main model (Qwen/Qwen-Image) defaults
    a = _run(pipe, seed=9, output_type="latent")
    b = _run(tiny_pipe, seed=9, output_type="latent")
    assert torch.equal(a, b)


def test_seed_api_with_model_ids_uses_cache_and_entry_defaults(models_dir):
    repo = "imagezoo/tiny-qwen-image"
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(
                model_id=repo,
                origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors",
                local_model_path=models_dir,
                skip_download=True,
            ),
            ModelConfig(
                model_id=repo,
                origin_file_pattern="text_encoder/model*.safetensors",
                local_model_path=models_dir,
                skip_download=True,
            ),
            ModelConfig(
                model_id=repo,
                origin_file_pattern="vae/diffusion_pytorch_model.safetensors",
                local_model_path=models_dir,
                skip_download=True,
            ),
        ],
        tokenizer_config=ModelConfig(
            model_id=repo, origin_file_pattern="tokenizer/", local_model_path=models_dir, skip_download=True
        ),
    )
    assert pipe.entry.id == repo and pipe.defaults.num_inference_steps == 8


def test_seed_api_errors(tiny_root, tmp_path):
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(junk))
    with pytest.raises(WeightsError, match=r"junk\.safetensors.*foo\.weight"):
        QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=junk)]
        )
    with pytest.raises(InputError, match="lack the text_encoder, vae, tokenizer"):
        QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=tiny_root / "transformer")]
        )
    with pytest.raises(InputError, match="Two model_configs give the dit"):
        QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32,
            device="cpu",
            model_configs=[ModelConfig(path=tiny_root / "transformer"), ModelConfig(path=tiny_root / "transformer")],
        )


def test_model_config_needs_exactly_one_source():
    with pytest.raises(InputError, match="either path"):
        ModelConfig()
    with pytest.raises(InputError, match="only one"):
        ModelConfig(path="x.safetensors", model_id="a/b")


def test_load_with_placement_strategy_builds_on_host(models_dir, monkeypatch):
    from imagezoo.pipeline import Pipeline

    seen = {}
    original = Pipeline.from_registry.__func__

    def recording(cls, model_id, **kwargs):
        seen.update(kwargs)
        return original(cls, model_id, **kwargs)

    monkeypatch.setattr(Pipeline, "from_registry", classmethod(recording))
    pipe = imagezoo.load("tiny", torch_dtype=torch.float32, local_model_path=models_dir, memory=["offload"])
    assert seen["build_device"] == "cpu" and [s.name for s in pipe.memory_strategies] == ["offload"]
    seen.clear()
    imagezoo.load("tiny", torch_dtype=torch.float32, local_model_path=models_dir, memory=["fp8"])
    assert "build_device" not in seen  # a storage-dtype strategy alone leaves the weights where they compute
