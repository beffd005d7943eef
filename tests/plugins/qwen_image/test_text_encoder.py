"""Qwen2.5-VL text encoder: parity with diffusers' QwenImagePipeline, key layouts, loading errors, truncation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imagezoo.errors import ConfigError, InputError, WeightsError
from imagezoo.plugins.qwen_image.text_encoder import (
    REAL_TEXT_ENCODER,
    TINY_TEXT_ENCODER,
    QwenTextEncoder,
    TextEncoderParams,
    build_text_encoder,
    is_text_encoder_checkpoint,
    normalize_text_encoder_keys,
)
from imagezoo.plugins.qwen_image.tokenizer import PROMPT_TEMPLATE, load_tokenizer, write_offline_tokenizer

# float32 on CPU: both sides run the same transformers kernels; the bound leaves room for padding-width effects.
ATOL = 1e-5
PROMPTS = ["a cat", '一只橘猫坐在窗台上, a neon sign that reads "OPEN", soft morning light, 35mm photo']
LONG_PROMPT = "a very detailed prompt about a red fox running through a snowy birch forest at dawn, " * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(write_offline_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEXT_ENCODER.to_config())).eval()
    # Default init leaves norms at 1 and biases at 0, which would hide a norm or bias loaded into the wrong place.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    return model


def _old_layout(new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of the published Qwen-Image checkpoint (transformers < 4.52 names)."""
    out = {}
    for key, tensor in new.items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        out[key] = tensor
    return out


@pytest.fixture(scope="module")
def checkpoints(hf_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    new = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    paths = {"new": folder / "new.safetensors", "old": folder / "old.safetensors"}
    save_file(new, paths["new"])
    save_file(_old_layout(new), paths["old"])
    return paths


@pytest.fixture(scope="module")
def encoder(checkpoints, tokenizer) -> QwenTextEncoder:
    return build_text_encoder(load_file(checkpoints["old"]), TINY_TEXT_ENCODER.to_config(), tokenizer)


@pytest.fixture(scope="module")
def reference(hf_model, tokenizer):
    """diffusers' official prompt encoding, with the tiny HF model as text encoder (other components unused)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=hf_model, tokenizer=tokenizer, transformer=None)

    def encode(prompts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_length)
        if mask is None:  # diffusers drops an all-true mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return embeds, mask.bool()

    encode.pipe = pipe
    return encode


def test_template_and_prefix_match_diffusers(reference, encoder) -> None:
    assert reference.pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert reference.pipe.prompt_template_encode_start_idx == encoder.drop_index == 34


@pytest.mark.parametrize("layout", ["old", "new"])
def test_parity_with_diffusers(layout: str, checkpoints, tokenizer, reference) -> None:
    encoder = build_text_encoder(load_file(checkpoints[layout]), None, tokenizer)
    out = encoder.encode(PROMPTS)
    embeds, mask = reference(PROMPTS)
    assert out.embeds.dtype == torch.float32
    assert out.embeds.shape == embeds.shape and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist()[0] < out.mask.sum(1).tolist()[1]  # really a padded batch
    assert torch.equal(out.mask, mask)
    assert (out.embeds - embeds).abs().max().item() <= ATOL
    assert not out.embeds[~out.mask].any()


def test_batch_equals_each_prompt_alone(encoder) -> None:
    batch = encoder.encode(PROMPTS)
    for index, prompt in enumerate(PROMPTS):
        alone = encoder.encode([prompt])
        assert alone.mask.all()
        trimmed = batch.select(index)
        assert trimmed.embeds.shape == alone.embeds.shape
        assert (trimmed.embeds - alone.embeds).abs().max().item() <= ATOL


def test_truncation_matches_diffusers_and_warns(encoder, reference, caplog: pytest.LogCaptureFixture) -> None:
    full = encoder.encode([LONG_PROMPT]).embeds.shape[1]
    with caplog.at_level(logging.WARNING, logger="imagezoo.plugins.qwen_image.text_encoder"):
        out = encoder.encode(["short", LONG_PROMPT], max_length=20)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Prompt 1" in warnings[0]
    assert str(full) in warnings[0] and "20" in warnings[0]
    embeds, mask = reference(["short", LONG_PROMPT], max_length=20)
    assert out.embeds.shape[1] == 20 and torch.equal(out.mask, mask)
    assert (out.embeds - embeds).abs().max().item() <= ATOL


@pytest.mark.parametrize("bad", [1025, 0, 2048])
def test_max_length_out_of_range(encoder, bad: int) -> None:
    with pytest.raises(InputError, match=str(bad)):
        encoder.encode(["a cat"], max_length=bad)


def test_max_length_1024_is_allowed(encoder) -> None:
    assert encoder.encode(["a cat"], max_length=1024).mask.all()


def test_nothing_left_on_meta(encoder, hf_model) -> None:
    tensors = [*encoder.model.named_parameters(), *encoder.model.named_buffers()]
    assert tensors and not [name for name, t in tensors if t.is_meta or t.device.type != "cpu"]
    reference_freq = hf_model.model.language_model.rotary_emb.inv_freq
    assert torch.equal(encoder.model.rotary_emb.inv_freq, reference_freq)
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bf16_keeps_model_dtype(checkpoints, tokenizer) -> None:
    encoder = build_text_encoder(load_file(checkpoints["new"]), None, tokenizer, dtype=torch.bfloat16)
    out = encoder.encode(PROMPTS)
    assert encoder.dtype == out.embeds.dtype == torch.bfloat16
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("layout", ["old", "new"])
def test_normalize_keeps_only_language_model(layout: str, checkpoints, hf_model) -> None:
    state = load_file(checkpoints[layout])
    assert is_text_encoder_checkpoint(state)
    renamed = normalize_text_encoder_keys(state)
    assert set(renamed) == set(hf_model.model.language_model.state_dict())
    assert not [k for k in renamed if "visual" in k or "lm_head" in k]


def test_other_checkpoints_are_not_text_encoders() -> None:
    assert not is_text_encoder_checkpoint(["transformer_blocks.0.attn.to_q.weight", "img_in.weight"])
    assert not is_text_encoder_checkpoint(["encoder.conv_in.weight", "decoder.conv_out.weight"])


def test_missing_key_is_named(checkpoints, tokenizer) -> None:
    state = load_file(checkpoints["old"])
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        build_text_encoder(state, TINY_TEXT_ENCODER.to_config(), tokenizer)


def test_junk_key_is_reported_while_vision_and_head_are_dropped(checkpoints, tokenizer) -> None:
    state = load_file(checkpoints["old"])
    state["model.junk.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as info:
        build_text_encoder(state, TINY_TEXT_ENCODER.to_config(), tokenizer)
    message = str(info.value)
    assert "model.junk.weight" in message and "1 unexpected" in message
    assert "visual" not in message and "lm_head" not in message and "missing" not in message


def test_mixed_layouts_are_refused(checkpoints) -> None:
    state = load_file(checkpoints["new"])
    state["model.norm.weight"] = state["model.language_model.norm.weight"]
    with pytest.raises(WeightsError, match=r"model\.norm\.weight"):
        normalize_text_encoder_keys(state)


def test_params_from_configs_and_shapes(hf_model, checkpoints) -> None:
    assert TextEncoderParams.from_config(TINY_TEXT_ENCODER.to_config()) == TINY_TEXT_ENCODER
    # transformers 5 saves a nested text_config
    assert TextEncoderParams.from_config(hf_model.config.to_dict()) == TINY_TEXT_ENCODER
    assert TextEncoderParams.from_config(REAL_TEXT_ENCODER.to_config()) == REAL_TEXT_ENCODER
    shapes = {k: tuple(v.shape) for k, v in load_file(checkpoints["old"]).items()}
    assert TextEncoderParams.from_shapes(shapes) == TINY_TEXT_ENCODER


def test_real_params_give_published_shapes() -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(REAL_TEXT_ENCODER.text_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["embed_tokens.weight"] == (152064, 3584)
    assert shapes["layers.27.self_attn.q_proj.weight"] == (3584, 3584)
    assert shapes["layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["layers.0.mlp.down_proj.weight"] == (3584, 18944)
    assert TextEncoderParams.from_shapes(shapes) == REAL_TEXT_ENCODER
    assert model.rotary_emb.mrope_section == [16, 24, 24]


def test_unknown_head_size_asks_for_config() -> None:
    shapes = {
        "model.embed_tokens.weight": (100, 24),
        "model.layers.0.self_attn.q_proj.weight": (24, 24),
        "model.layers.0.self_attn.k_proj.weight": (24, 24),
        "model.layers.0.mlp.gate_proj.weight": (48, 24),
    }
    with pytest.raises(ConfigError, match=r"config\.json"):
        TextEncoderParams.from_shapes(shapes)
