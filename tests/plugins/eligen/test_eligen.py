"""EliGen: registry entries, entity regions, the joint-attention mask, locality of entity text, and generation."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagezoo import weights
from imagezoo.cli import main as cli_main
from imagezoo.errors import InputError
from imagezoo.lora import LoraLayer, lora_state_dict
from imagezoo.pipeline import Pipeline
from imagezoo.plugin_manager import get_kernel
from imagezoo.plugins.eligen.entities import build_attention_mask, entity_regions, text_positions
from imagezoo.plugins.qwen_image.dit import TINY_DIT, DiTParams, QwenImageDiT, pack_latents

SIZE = 64  # pixels: 8x8 latents, 4x4 patches


def _mask(box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE), mode: str = "L") -> Image.Image:
    """A black image with a white rectangle (x0, y0, x1, y1)."""
    image = Image.new(mode, size, 0)
    image.paste((255,) * len(mode) if mode != "L" else 255, box)
    return image


LEFT = _mask((0, 0, SIZE // 2, SIZE))
TOP = _mask((0, 0, SIZE, SIZE // 2))


def test_registry_has_the_three_eligen_models_as_lora_entries():
    models = get_kernel().models
    for alias, model_id in (
        ("eligen", "DiffSynth-Studio/Qwen-Image-EliGen"),
        ("eligen-v2", "DiffSynth-Studio/Qwen-Image-EliGen-V2"),
        ("eligen-poster", "DiffSynth-Studio/Qwen-Image-EliGen-Poster"),
    ):
        entry = models.get(alias)
        assert entry.id == model_id and entry.family == "qwen_image"
        assert models.provenance(model_id) == "imagezoo.plugins.eligen"
        assert [(a.pattern, a.model_id) for a in entry.adapters] == [("model.safetensors", None)]
        assert {entry.component_model_id(c) for c in entry.components} == {"Qwen/Qwen-Image"}
        assert entry.defaults.height % 16 == 0 and entry.defaults.width % 16 == 0


def test_download_fetches_the_base_files_and_the_eligen_lora(tiny_root, tmp_path, monkeypatch, capsys):
    repos = {"Qwen/Qwen-Image": tiny_root, "DiffSynth-Studio/Qwen-Image-EliGen-V2": tmp_path / "eligen"}
    repos["DiffSynth-Studio/Qwen-Image-EliGen-V2"].mkdir()
    layer = LoraLayer(torch.zeros(4, 32), torch.zeros(32, 4))
    save_file(
        lora_state_dict({"transformer_blocks.0.attn.to_q": layer}, "diffsynth"),
        str(tmp_path / "eligen" / "model.safetensors"),
    )
    fetched = []

    def hub(model_id, *, local_dir, allow_patterns, source):
        fetched.append((model_id, tuple(allow_patterns or ())))
        for src in repos[model_id].rglob("*"):
            rel = src.relative_to(repos[model_id]).as_posix()
            if src.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (local_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, local_dir / rel)

    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    assert cli_main(["download", "eligen-v2", "--local-model-path", str(tmp_path / "models")]) == 0
    assert "adapter: 1 file(s)" in capsys.readouterr().out
    assert (tmp_path / "models" / "DiffSynth-Studio" / "Qwen-Image-EliGen-V2" / "model.safetensors").is_file()
    assert [model_id for model_id, _ in fetched].count("Qwen/Qwen-Image") == 4


def test_attention_mask_equals_hand_built_mask_for_two_entities_on_4x4_patches():
    # Text: entity 0 (2 tokens), entity 1 (3 tokens), global (2 tokens); image: 4x4 patches, row-major.
    regions = entity_regions([LEFT, TOP], height=SIZE, width=SIZE, spatial_factor=8, patch_size=2)
    mask = build_attention_mask([2, 3, 2], torch.ones(1, 7, dtype=torch.bool), regions)

    e0, e1, glob, img = range(0, 2), range(2, 5), range(5, 7), range(7, 23)
    left = {7 + 4 * r + c for r in range(4) for c in range(2)}
    top = {7 + 4 * r + c for r in range(2) for c in range(4)}
    allowed = {(q, k) for q in img for k in img}
    for segment, region in ((e0, left), (e1, top), (glob, set(img))):
        allowed |= {(q, k) for q in segment for k in segment}
        allowed |= {(q, k) for q in segment for k in region} | {(k, q) for q in segment for k in region}
    expected = torch.zeros(23, 23, dtype=torch.bool)
    for q, k in allowed:
        expected[q, k] = True
    assert mask.shape == (1, 1, 23, 23)
    assert torch.equal(mask[0, 0], expected)

    # With a padded global prompt, the padding is never attended to and nothing else changes.
    padded = build_attention_mask([2, 3, 2], torch.tensor([[True] * 7, [True] * 6 + [False]]), regions)
    assert torch.equal(padded[0, 0], expected)
    assert not padded[1, 0, :, 6].any()
    assert torch.equal(padded[1, 0, :, :6], expected[:, :6]) and torch.equal(padded[1, 0, :, 7:], expected[:, 7:])
    assert torch.equal(text_positions([2, 3, 2], start=2), torch.tensor([2, 3, 2, 3, 4, 2, 3]))


def test_regions_use_nearest_resizing_and_any_latent_pixel_of_a_patch():
    regions = entity_regions(
        [
            _mask((0, 0, 8, 8)),  # exactly latent pixel (0, 0): patch (0, 0)
            _mask((24, 24, 32, 32)),  # latent pixel (3, 3): the corner of patch (1, 1)
            _mask((0, 0, 16, 32), size=(32, 32), mode="RGB"),  # another size: left half after resizing
            _mask((0, 0, 64, 16), mode="RGBA"),  # top two latent rows
        ],
        height=SIZE,
        width=SIZE,
        spatial_factor=8,
        patch_size=2,
    )
    grids = regions.view(4, 4, 4)
    assert grids[0].nonzero().tolist() == [[0, 0]]
    assert grids[1].nonzero().tolist() == [[1, 1]]
    assert torch.equal(grids[2], torch.tensor([[True, True, False, False]] * 4))
    assert torch.equal(grids[3], torch.tensor([[True] * 4] + [[False] * 4] * 3))


def test_entity_text_cannot_change_image_tokens_outside_its_region():
    torch.manual_seed(0)
    params = DiTParams(**{**TINY_DIT.__dict__, "num_layers": 1})
    dit = QwenImageDiT(params).eval()
    regions = entity_regions([LEFT, TOP], height=SIZE, width=SIZE, spatial_factor=8, patch_size=2)
    slots = [2, 3, 2]
    mask = build_attention_mask(slots, torch.ones(1, 7, dtype=torch.bool), regions)
    positions = text_positions(slots, start=2)
    latents, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.6])
    text = torch.randn(1, 7, TINY_DIT.text_dim)

    def tokens(text_in: torch.Tensor, attention_mask: torch.Tensor | None = mask) -> torch.Tensor:
        with torch.no_grad():
            out = dit(latents, sigma, text_in, text_positions=positions, attention_mask=attention_mask)
        return pack_latents(out)[0]  # (16 image tokens, channels)

    base = tokens(text)
    for entity, span in ((0, slice(0, 2)), (1, slice(2, 5))):
        perturbed = text.clone()
        perturbed[:, span] += 3.0 * torch.randn_like(perturbed[:, span])
        changed = tokens(perturbed)
        inside, outside = regions[entity], ~regions[entity]
        assert torch.equal(changed[outside], base[outside]), entity
        assert (changed[inside] - base[inside]).abs().max() > 1e-3, entity
        # Without the EliGen mask the same change reaches every image token.
        assert (tokens(perturbed, None)[outside] - tokens(text, None)[outside]).abs().max() > 1e-3
    glob = text.clone()
    glob[:, 5:] += 3.0
    assert ((tokens(glob) - base).abs().amax(dim=1) > 1e-4).all()  # the global prompt reaches every token


@pytest.fixture(scope="module")
def eligen_pipe(models_dir: Path) -> Pipeline:
    """The tiny model with a random rank-4 'EliGen' LoRA in DiffSynth's key format (own copy: it is modified)."""
    pipe = Pipeline.from_registry("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    modules = dict(pipe.components.modules["dit"].named_modules())
    generator = torch.Generator().manual_seed(11)
    layers = {}
    for name, module in modules.items():
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            layers[name] = LoraLayer(
                torch.randn(4, in_features, generator=generator) * 0.1,
                torch.randn(out_features, 4, generator=generator) * 0.1,
            )
    pipe.load_lora(lora_state_dict(layers, "diffsynth"), name="eligen")
    return pipe


def _run(pipe: Pipeline, prompt="a cat and a dog", **kwargs):
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "seed": 3, "progress_bar_cmd": lambda x: x}
    options["output_type"] = "latent"
    return pipe(prompt, **{**options, **kwargs})


def test_generation_is_deterministic_and_the_entities_matter(eligen_pipe):
    entities = {"eligen_entity_prompts": ["a cat", "a small dog"], "eligen_entity_masks": [LEFT, TOP]}
    first, second = _run(eligen_pipe, **entities), _run(eligen_pipe, **entities)
    assert torch.equal(first, second)
    assert (first - _run(eligen_pipe)).abs().max() > 1e-3
    swapped = _run(eligen_pipe, eligen_entity_prompts=["a small dog", "a cat"], eligen_entity_masks=[LEFT, TOP])
    assert (first - swapped).abs().max() > 1e-3
    on_negative = _run(eligen_pipe, eligen_enable_on_negative=True, **entities)
    assert (on_negative - first).abs().max() > 1e-4  # default cfg 4: the negative pass now has entities too
    assert torch.equal(_run(eligen_pipe, entity_prompts=["a cat", "a small dog"], entity_masks=[LEFT, TOP]), first)
    image = eligen_pipe(
        "a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=1,
        seed=0,
        progress_bar_cmd=lambda x: x,
        eligen_entity_prompts=["a cat"],
        eligen_entity_masks=[LEFT],
    )
    assert image.size == (SIZE, SIZE)


def test_batch_gives_each_prompt_the_image_it_gets_alone(eligen_pipe):
    entities = {"eligen_entity_prompts": ["a cat", "a small brown dog"], "eligen_entity_masks": [LEFT, TOP]}
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    prompts = ["a cat and a dog", "a cat and a dog on a long sunny beach at noon"]
    for on_negative in (False, True):
        batch = _run(
            eligen_pipe,
            prompts,
            latents=noise,
            eligen_enable_on_negative=on_negative,
            negative_prompt=["", "blurry, dark"],
            **entities,
        )
        for index, prompt in enumerate(prompts):
            alone = _run(
                eligen_pipe,
                prompt,
                latents=noise[index : index + 1],
                eligen_enable_on_negative=on_negative,
                negative_prompt=["", "blurry, dark"][index],
                **entities,
            )
            assert (batch[index : index + 1] - alone).abs().max() <= 1e-5, (on_negative, index)


def test_without_cfg_and_with_fused_lora(eligen_pipe):
    entities = {"eligen_entity_prompts": ["a cat"], "eligen_entity_masks": [LEFT]}
    unfused = _run(eligen_pipe, cfg_scale=1.0, **entities)
    eligen_pipe.fuse_lora()
    try:
        fused = _run(eligen_pipe, cfg_scale=1.0, **entities)
    finally:
        eligen_pipe.unfuse_lora()
    assert (fused - unfused).abs().max() <= 1e-5


def test_with_a_memory_strategy_and_unfused_lora(eligen_pipe):
    entities = {"eligen_entity_prompts": ["a cat"], "eligen_entity_masks": [LEFT]}
    plain = _run(eligen_pipe, **entities)
    eligen_pipe.enable_memory(["offload"])
    try:
        assert (_run(eligen_pipe, **entities) - plain).abs().max() <= 1e-5
        with pytest.raises(InputError, match=r"disable_memory\(\)"):
            eligen_pipe.fuse_lora()
    finally:
        eligen_pipe.disable_memory()
    assert (_run(eligen_pipe, **entities) - plain).abs().max() <= 1e-5


def test_invalid_entity_inputs_are_clear_errors(eligen_pipe, tmp_path):
    not_image = tmp_path / "mask.txt"
    not_image.write_text("white")
    cases = [
        ({"eligen_entity_prompts": ["a", "b"], "eligen_entity_masks": [LEFT]}, r"2 entries.*has 1"),
        ({"eligen_entity_prompts": ["a"]}, r"1 entries.*has 0"),
        ({"eligen_entity_masks": [LEFT]}, r"0 entries.*has 1"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [Image.new("L", (64, 64))]}, r"\[0\] is empty"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [np.ones((64, 64))]}, r"PIL image.*ndarray"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [str(not_image)]}, r"not an image file"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [tmp_path / "nope.png"]}, r"does not exist"),
        ({"eligen_entity_prompts": "a cat", "eligen_entity_masks": [LEFT]}, r"must be a list"),
        ({"eligen_entity_prompts": [3], "eligen_entity_masks": [LEFT]}, r"must be strings"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [_mask((0, 0, 2, 2))]}, r"too small"),
        ({"eligen_entity_prompts": ["a"], "eligen_entity_masks": [LEFT], "eligen_enable_on_negative": "yes"}, "True"),
        ({"eligen_entity_prompt": ["a"]}, r"'eligen_entity_prompt'.*accepted.*eligen_entity_prompts"),
        ({"eligen_entity_prompts": ["a"], "entity_prompts": ["a"], "eligen_entity_masks": [LEFT]}, r"given twice"),
    ]
    for inputs, message in cases:
        with pytest.raises(InputError, match=message):
            _run(eligen_pipe, **inputs)


def test_cli_entity_flags_and_config_inputs(models_dir, tmp_path):
    layers = {
        "transformer_blocks.0.attn.to_q": LoraLayer(torch.randn(4, 32) * 0.1, torch.randn(32, 4) * 0.1),
    }
    lora = tmp_path / "eligen.safetensors"
    save_file(lora_state_dict(layers, "diffsynth"), str(lora))
    LEFT.save(tmp_path / "left.png")
    TOP.save(tmp_path / "top.png")
    common = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a cat and a dog",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "2",
        "--device",
        "cpu",
        "--local-model-path",
        str(models_dir),
    ]
    flags = [
        "--lora",
        str(lora),
        "--entity-prompt",
        "a cat",
        "--entity-mask",
        str(tmp_path / "left.png"),
        "--entity-prompt",
        "a dog",
        "--entity-mask",
        str(tmp_path / "top.png"),
    ]
    assert cli_main([*common, *flags, "--out", str(tmp_path / "flags.png")]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(
        f"loras: ['{lora}:1.0']\n"
        f"inputs:\n  eligen_entity_prompts: [a cat, a dog]\n"
        f"  eligen_entity_masks: ['{tmp_path / 'left.png'}', '{tmp_path / 'top.png'}']\n"
    )
    assert cli_main([*common, "--config", str(config), "--out", str(tmp_path / "config.png")]) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "flags.png")), np.asarray(Image.open(tmp_path / "config.png"))
    )
    assert cli_main([*common, "--entity-prompt", "a cat", "--out", str(tmp_path / "bad.png")]) == 2
