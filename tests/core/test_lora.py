"""LoRA: key formats, detection, exact alpha/rank scaling, hooks vs fusing, exact unfuse, save/convert round trips."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imagezoo import hookimpl
from imagezoo.cli import main as cli_main
from imagezoo.errors import InputError, WeightsError
from imagezoo.lora import (
    FORMATS,
    LoraLayer,
    LoraManager,
    convert_lora_state_dict,
    detect_lora_format,
    lora_state_dict,
    parse_lora_spec,
    parse_lora_state_dict,
)
from imagezoo.pipeline import Pipeline
from imagezoo.plugin_manager import Kernel, get_kernel
from imagezoo.plugins.qwen_image.dit import TINY_DIT, QwenImageDiT

TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.2",
    "img_mod.1",
    "txt_mlp.net.2",
    "txt_mod.1",
)


@pytest.fixture(scope="module")
def dit() -> QwenImageDiT:
    torch.manual_seed(0)
    return QwenImageDiT(TINY_DIT).eval().requires_grad_(False)


def random_lora(root: torch.nn.Module, rank: int = 4, alpha: float | None = 8.0, seed: int = 1) -> dict[str, LoraLayer]:
    """A LoRA on the 12 standard targets of every block, with non-zero up factors."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(root.named_modules())
    layers = {}
    for block in range(TINY_DIT.num_layers):
        for target in TARGETS:
            name = f"transformer_blocks.{block}.{target}"
            out_features, in_features = modules[name].weight.shape
            down = torch.randn(rank, in_features, generator=generator) * 0.1
            up = torch.randn(out_features, rank, generator=generator) * 0.1
            layers[name] = LoraLayer(down, up, alpha)
    return layers


def expected_weights(root: torch.nn.Module, *loras: tuple[dict[str, LoraLayer], float]) -> dict[str, torch.Tensor]:
    """Base weights plus each LoRA's scale * alpha/rank * up @ down, computed by hand in float64."""
    modules = dict(root.named_modules())
    out = {}
    for layers, scale in loras:
        for name, layer in layers.items():
            base = out.get(name, modules[name].weight.double())
            ratio = (layer.alpha if layer.alpha is not None else layer.rank) / layer.rank
            out[name] = base + scale * ratio * (layer.up.double() @ layer.down.double())
    return out


def dit_inputs(seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.tensor([0.7]),
        torch.randn(1, 5, TINY_DIT.text_dim, generator=g),
    )


def test_each_format_has_the_documented_keys_and_is_detected(dit):
    layer = LoraLayer(torch.ones(2, 32), torch.ones(32, 2), alpha=4.0)
    name = "transformer_blocks.0.attn.to_add_out"
    expected = {
        "peft": {f"{name}.lora_A.weight", f"{name}.lora_B.weight"},
        "diffusers": {f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight"},
        "diffsynth": {f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"},
        "kohya": {
            "lora_unet_transformer_blocks_0_attn_to_add_out.lora_down.weight",
            "lora_unet_transformer_blocks_0_attn_to_add_out.lora_up.weight",
            "lora_unet_transformer_blocks_0_attn_to_add_out.alpha",
        },
        "comfyui": {f"diffusion_model.{name}.lora_A.weight", f"diffusion_model.{name}.lora_B.weight"},
    }
    for fmt in FORMATS:
        state = lora_state_dict({name: layer}, fmt)
        assert set(state) == expected[fmt], fmt
        assert detect_lora_format(state) == fmt
    kohya = lora_state_dict({name: layer}, "kohya")
    assert kohya["lora_unet_transformer_blocks_0_attn_to_add_out.alpha"].ndim == 0
    assert float(kohya["lora_unet_transformer_blocks_0_attn_to_add_out.alpha"]) == 4.0
    # Formats without an alpha tensor carry alpha/rank (here 2) in lora_B.
    assert torch.equal(lora_state_dict({name: layer}, "peft")[f"{name}.lora_B.weight"], torch.full((32, 2), 2.0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_to_the_same_effective_weights(dit, fmt):
    layers = random_lora(dit, rank=4, alpha=8.0)
    target = copy.deepcopy(dit)
    manager = LoraManager(target)
    manager.load(lora_state_dict(layers, fmt), name="x")
    manager.fuse()
    modules = dict(target.named_modules())
    for name, want in expected_weights(dit, (layers, 1.0)).items():
        assert (modules[name].weight.double() - want).abs().max() <= 1e-6, name
    untouched = dict(dit.named_modules())
    assert torch.equal(modules["img_in"].weight, untouched["img_in"].weight)


def test_kohya_underscored_names_resolve_against_the_model(dit):
    layers = random_lora(dit)
    kohya = lora_state_dict(layers, "kohya")
    parsed = parse_lora_state_dict(kohya, module_names=[n for n, _ in dit.named_modules()])
    assert set(parsed) == set(layers)
    assert "transformer_blocks.1.attn.to_add_out" in parsed and "transformer_blocks.0.img_mlp.net.2" in parsed
    with pytest.raises(InputError, match="module_names"):
        parse_lora_state_dict(kohya)


def test_keys_that_match_nothing_are_errors_naming_them(dit):
    state = lora_state_dict(random_lora(dit), "peft")
    names = [n for n, _ in dit.named_modules()]
    extra = dict(state)
    extra["transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    extra["transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    with pytest.raises(WeightsError, match=r"transformer_blocks\.7\.attn\.to_q"):
        parse_lora_state_dict(extra, module_names=names)
    with pytest.raises(WeightsError, match=r"blocks\.7"):
        LoraManager(copy.deepcopy(dit)).load(extra)
    odd = dict(state)
    odd["transformer_blocks.0.attn.to_q.dora_scale"] = torch.ones(32)
    with pytest.raises(WeightsError, match="dora_scale"):
        parse_lora_state_dict(odd, module_names=names)
    lonely = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.0.attn.to_q.lora_B")}
    with pytest.raises(WeightsError, match=r"transformer_blocks\.0\.attn\.to_q.*only its down"):
        parse_lora_state_dict(lonely, module_names=names)
    misshaped = dict(state)
    misshaped["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 7)
    with pytest.raises(WeightsError, match=r"to_q.*32x7"):
        LoraManager(copy.deepcopy(dit)).load(misshaped)
    kohya = lora_state_dict(random_lora(dit), "kohya")
    kohya["lora_unet_transformer_blocks_0_attn_to_nowhere.lora_down.weight"] = torch.zeros(4, 32)
    kohya["lora_unet_transformer_blocks_0_attn_to_nowhere.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(WeightsError, match="lora_unet_transformer_blocks_0_attn_to_nowhere"):
        parse_lora_state_dict(kohya, module_names=names)
    with pytest.raises(WeightsError, match="Is this a LoRA file"):
        detect_lora_format(["img_in.weight"])


def test_fused_equals_unfused_and_unfuse_restores_exactly(dit):
    target = copy.deepcopy(dit)
    originals = {k: v.clone() for k, v in target.state_dict().items()}
    inputs = dit_inputs()
    base = target(*inputs)
    manager = LoraManager(target)
    manager.load(lora_state_dict(random_lora(dit, alpha=2.0), "diffsynth"), scale=0.8, name="a")
    unfused = target(*inputs)
    assert (unfused - base).abs().max() > 1e-3  # the LoRA does something
    assert all(torch.equal(v, originals[k]) for k, v in target.state_dict().items())  # hooks leave weights alone
    manager.fuse()
    fused = target(*inputs)
    assert (fused - unfused).abs().max() <= 1e-5
    manager.unfuse()
    assert all(torch.equal(v, originals[k]) for k, v in target.state_dict().items())
    assert torch.allclose(target(*inputs), unfused, atol=1e-6, rtol=0)
    manager.fuse()
    manager.unload()
    assert all(torch.equal(v, originals[k]) for k, v in target.state_dict().items())
    assert torch.equal(target(*inputs), base)
    assert not target.transformer_blocks[0].attn.to_q._forward_hooks  # hooks removed with the last LoRA


def test_several_loras_scales_and_unloading_one(dit):
    one, two = random_lora(dit, alpha=8.0, seed=1), random_lora(dit, rank=2, alpha=None, seed=2)
    target = copy.deepcopy(dit)
    manager = LoraManager(target)
    manager.load(lora_state_dict(one, "kohya"), scale=0.5, name="one")
    manager.load(lora_state_dict(two, "comfyui"), scale=-1.0, name="two")
    with pytest.raises(InputError, match="already loaded"):
        manager.load(lora_state_dict(two, "peft"), name="two")
    manager.fuse()
    modules = dict(target.named_modules())

    def check(*loras):
        for name, want in expected_weights(dit, *loras).items():
            assert (modules[name].weight.double() - want).abs().max() <= 1e-6, name

    check((one, 0.5), (two, -1.0))
    manager.set_scale("one", 2.0)
    check((one, 2.0), (two, -1.0))
    manager.unload("two")
    check((one, 2.0))
    with pytest.raises(InputError, match=r"No LoRA named 'two'.*loaded: one"):
        manager.unload("two")


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_load_round_trip_is_lossless(dit, tmp_path, fmt):
    exact = random_lora(dit, rank=4, alpha=4.0)  # alpha == rank: factors come back bit for bit
    manager = LoraManager(copy.deepcopy(dit))
    manager.load(lora_state_dict(exact, "peft"), name="exact")
    path = manager.save(tmp_path / f"exact-{fmt}.safetensors", format=fmt)
    again = LoraManager(copy.deepcopy(dit))
    again.load(path)
    for name, layer in again.adapters["exact-" + fmt].layers.items():
        assert torch.equal(layer.down, exact[name].down) and torch.equal(layer.up, exact[name].up)
    assert _same_tensors(load_file(path), load_file(again.save(tmp_path / f"again-{fmt}.safetensors", format=fmt)))

    scaled = random_lora(dit, rank=4, alpha=3.0)  # alpha != rank: the update is preserved
    manager = LoraManager(copy.deepcopy(dit))
    manager.load(lora_state_dict(scaled, "kohya"), name="scaled")
    path = manager.save(tmp_path / f"scaled-{fmt}.safetensors", format=fmt)
    again = LoraManager(copy.deepcopy(dit))
    again.load(path, name="back")
    for name, layer in again.adapters["back"].layers.items():
        assert (layer.delta(torch.float64) - scaled[name].delta(torch.float64)).abs().max() <= 1e-6
        if fmt == "kohya":
            assert layer.alpha == 3.0 and torch.equal(layer.up, scaled[name].up)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_saving_several_loras_saves_their_sum(dit, tmp_path):
    one, two = random_lora(dit, alpha=8.0, seed=1), random_lora(dit, rank=2, alpha=1.0, seed=2)
    manager = LoraManager(copy.deepcopy(dit))
    manager.load(lora_state_dict(one, "peft"), scale=0.3, name="one")
    manager.load(lora_state_dict(two, "kohya"), scale=2.0, name="two")
    path = manager.save(tmp_path / "sum.safetensors", format="comfyui")
    target = copy.deepcopy(dit)
    merged = LoraManager(target)
    merged.load(path)
    merged.fuse()
    modules = dict(target.named_modules())
    for name, want in expected_weights(dit, (one, 0.3), (two, 2.0)).items():
        assert (modules[name].weight.double() - want).abs().max() <= 1e-6, name


def test_convert_lora_state_dict_between_formats(dit):
    layers = random_lora(dit, alpha=8.0)
    names = [n for n, _ in dit.named_modules()]
    comfy = convert_lora_state_dict(lora_state_dict(layers, "kohya"), "comfyui", module_names=names)
    assert detect_lora_format(comfy) == "comfyui"
    back = parse_lora_state_dict(comfy, module_names=names)
    for name, layer in back.items():
        assert (layer.delta(torch.float64) - layers[name].delta(torch.float64)).abs().max() <= 1e-6
    # A PEFT state dict trained with lora_alpha != r carries no alpha: say it when converting.
    peft = {k: v for k, v in lora_state_dict({n: LoraLayer(v.down, v.up) for n, v in layers.items()}, "peft").items()}
    diffsynth = convert_lora_state_dict(peft, "diffsynth", alpha=8.0)
    name = "transformer_blocks.0.attn.to_q"
    assert torch.allclose(diffsynth[f"{name}.lora_B.default.weight"], layers[name].up * 2.0)


def test_diffusers_reads_the_files_we_write_as_the_same_update(dit):
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    layers = random_lora(dit, rank=4, alpha=2.0)
    for fmt in ("kohya", "comfyui", "diffsynth"):
        converted = conversion._convert_non_diffusers_qwen_lora_to_diffusers(lora_state_dict(layers, fmt))
        for name, layer in layers.items():
            a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
            assert (b.double() @ a.double() - layer.delta(torch.float64)).abs().max() <= 1e-6, (fmt, name)


def test_peft_adapter_folder_reads_lora_alpha(dit, tmp_path):
    layers = {n: LoraLayer(v.down, v.up) for n, v in random_lora(dit, rank=4).items()}
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(lora_state_dict(layers, "peft"), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    manager = LoraManager(copy.deepcopy(dit))
    manager.load(folder, name="peft")
    assert {layer.scale for layer in manager.adapters["peft"].layers.values()} == {2.0}


def test_fuse_refuses_weights_it_cannot_rewrite(dit):
    target = copy.deepcopy(dit)
    manager = LoraManager(target)
    manager.load(lora_state_dict(random_lora(dit), "peft"), name="x")
    to_q = target.transformer_blocks[0].attn.to_q
    weight = to_q.weight
    to_q.weight = torch.nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(InputError, match=r"float8_e4m3fn.*unfused"):
        manager.fuse()
    assert not manager.fused
    to_q.weight = weight
    to_k = target.transformer_blocks[0].attn.to_k
    to_k.forward = to_k.forward  # an instance-level forward, as FP8 compute paths install
    with pytest.raises(InputError, match=r"to_k.*forward was replaced"):
        manager.fuse()
    assert not manager.fused and torch.equal(to_k.weight, dit.transformer_blocks[0].attn.to_k.weight)


def test_lora_spec_parsing():
    assert parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_spec("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert parse_lora_spec("/a/b:c/style.safetensors:-1e-1") == ("/a/b:c/style.safetensors", -0.1)
    assert parse_lora_spec("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)


# ---- pipeline API, registry adapters, CLI --------------------------------------------------------------------------


def _tiny(models_dir: Path, kernel: Kernel | None = None, model: str = "tiny") -> Pipeline:
    return Pipeline.from_registry(
        model, device="cpu", torch_dtype=torch.float32, local_model_path=models_dir, kernel=kernel
    )


def _latents(pipe: Pipeline) -> torch.Tensor:
    return pipe(
        "a red bicycle",
        cfg_scale=4.0,
        height=64,
        width=64,
        num_inference_steps=2,
        seed=5,
        output_type="latent",
        progress_bar_cmd=lambda x: x,
    )


def test_pipeline_lora_methods(models_dir, tmp_path):
    pipe = _tiny(models_dir)
    dit = pipe.components.modules["dit"]
    save_file(lora_state_dict(random_lora(dit, seed=4), "kohya"), str(tmp_path / "style.safetensors"))
    base = _latents(pipe)
    assert pipe.load_lora(tmp_path / "style.safetensors", scale=0.7) == "style"
    assert pipe.loras == {"style": 0.7}
    unfused = _latents(pipe)
    assert (unfused - base).abs().max() > 1e-3
    pipe.fuse_lora()
    assert torch.allclose(_latents(pipe), unfused, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    saved = pipe.save_lora(tmp_path / "out.safetensors", format="diffsynth")
    assert detect_lora_format(load_file(saved)) == "diffsynth"
    pipe.unload_lora()
    assert pipe.loras == {} and torch.equal(_latents(pipe), base)
    pipe.load_lora(saved, name="again")  # scale 0.7 was folded into the saved file
    assert torch.allclose(_latents(pipe), unfused, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="No component 'unet'"):
        pipe.load_lora(saved, component="unet")


class _AdapterModels:
    @hookimpl
    def register_models(self, register):
        register(
            {
                "id": "test/tiny-with-lora",
                "family": "qwen_image",
                "components": {
                    name: {"model_id": "imagezoo/tiny-qwen-image", "pattern": pattern}
                    for name, pattern in {
                        "dit": "transformer/diffusion_pytorch_model*.safetensors",
                        "text_encoder": "text_encoder/model*.safetensors",
                        "vae": "vae/diffusion_pytorch_model.safetensors",
                        "tokenizer": "tokenizer/",
                    }.items()
                },
                "adapters": [{"pattern": "model.safetensors"}],
                "defaults": {"num_inference_steps": 2, "height": 64, "width": 64},
            }
        )


def test_registry_adapters_are_loaded_by_model_id(dit, models_dir, tmp_path):
    local = tmp_path / "models"
    (local / "imagezoo").mkdir(parents=True)
    (local / "imagezoo" / "tiny-qwen-image").symlink_to(models_dir / "imagezoo" / "tiny-qwen-image")
    lora = local / "test" / "tiny-with-lora" / "model.safetensors"
    lora.parent.mkdir(parents=True)
    save_file(lora_state_dict(random_lora(dit, seed=6), "diffsynth"), str(lora))
    kernel = Kernel(load=[])
    kernel.pm.register(_AdapterModels(), name="adapter-models")
    pipe = _tiny(local, kernel=kernel, model="test/tiny-with-lora")
    assert pipe.loras == {"test/tiny-with-lora": 1.0}
    with_adapter = _latents(pipe)
    pipe.unload_lora()
    assert (_latents(pipe) - with_adapter).abs().max() > 1e-3
    pipe.load_lora(lora)
    assert torch.equal(_latents(pipe), with_adapter)


def test_cli_lora_flag_and_convert(dit, models_dir, tmp_path, capsys):
    layers = random_lora(dit, seed=7)
    kohya = tmp_path / "k.safetensors"
    save_file(lora_state_dict(layers, "kohya"), str(kohya))
    out = tmp_path / "c.safetensors"
    assert cli_main(["lora", "convert", str(kohya), str(out), "--to", "comfyui"]) == 2  # kohya needs --base
    assert "--base" in capsys.readouterr().err
    base = str(models_dir / "imagezoo" / "tiny-qwen-image" / "transformer")
    assert cli_main(["lora", "convert", str(kohya), str(out), "--to", "comfyui", "--base", base]) == 0
    assert detect_lora_format(load_file(out)) == "comfyui"
    assert cli_main(["lora", "info", str(out)]) == 0
    assert "format: comfyui" in capsys.readouterr().out
    args = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--local-model-path",
        str(models_dir),
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "lora.png"), "--lora", f"{out}:2", "--fuse-lora"]) == 0
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "lora.png").read_bytes()
    assert cli_main([*args, "--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_lightning_entry_is_a_lora_entry_with_the_few_step_sampler():
    entry = get_kernel().models.get("qwen-image-lightning")
    assert entry.defaults.sampler == "flow_match_euler_lightning"
    assert (entry.defaults.num_inference_steps, entry.defaults.cfg_scale) == (8, 1.0)
    assert entry.adapters and entry.adapters[0].pattern.endswith(".safetensors")
    assert all(entry.component_model_id(c) == "Qwen/Qwen-Image" for c in entry.components)
