"""The `imagezoo` command: generate, models, plugins, inspect, download (download function substituted)."""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image
from safetensors.torch import save_file

from imagezoo import cli, weights


def test_generate_writes_png_of_requested_size(models_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "img.png"
    code = cli.main(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "a red bicycle",
            "--out",
            str(out),
            "--height",
            "64",
            "--width",
            "96",
            "--steps",
            "2",
            "--seed",
            "1",
            "--local-model-path",
            str(models_dir),
        ]
    )
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 64)
    assert f"wrote {out}" in capsys.readouterr().out


def test_generate_from_yaml_config_with_flag_override(models_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: tiny\nprompt: [a cat, a dog]\nheight: 32\nwidth: 32\nnum_inference_steps: 1\n"
        f"local_model_path: {models_dir}\nout: {tmp_path / 'b.png'}\n"
    )
    assert cli.main(["generate", "--config", str(config), "--width", "48"]) == 0
    for name in ("b-0.png", "b-1.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (48, 32)


def test_errors_exit_2_with_message(models_dir, tmp_path, capsys):
    code = cli.main(["generate", "--model", "qwen-imgae", "--prompt", "x", "--local-model-path", str(models_dir)])
    assert code == 2 and "Did you mean" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nprompt: x\nstepz: 3\n")
    assert cli.main(["generate", "--config", str(bad)]) == 2
    assert "stepz" in capsys.readouterr().err
    assert (
        cli.main(
            ["generate", "--model", "tiny", "--prompt", "x", "--height", "50", "--local-model-path", str(models_dir)]
        )
        == 2
    )
    assert "height=50" in capsys.readouterr().err


def test_models_and_plugins_listing(capsys):
    assert cli.main(["models", "--json"]) == 0
    models = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert models["Qwen/Qwen-Image"]["plugin"] == "imagezoo (registry.yaml)"
    assert "qwen-image" in models["Qwen/Qwen-Image"]["aliases"]
    assert models["imagezoo/tiny-qwen-image"]["defaults"]["num_inference_steps"] == 8
    assert cli.main(["models"]) == 0
    assert "DiffSynth-Studio/Qwen-Image-Distill-Full" in capsys.readouterr().out
    assert cli.main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert "register_samplers" in plugins["imagezoo.plugins.samplers"]["hooks"]


def test_inspect_reports_component_and_key_differences(tiny_root, tmp_path, capsys):
    assert cli.main(["inspect", str(tiny_root / "transformer"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["component"] == "dit" and report["matches_architecture"] and report["files"] == 2
    assert report["parameters"] > 0 and report["dtypes"] == {"F32": report["tensors"]}
    assert cli.main(["inspect", str(tiny_root / "text_encoder"), "--json"]) == 0
    assert "published layout" in json.loads(capsys.readouterr().out)["format"]

    # A VAE checkpoint with one tensor removed and one added: named, exit code 1.
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_root / "vae" / "diffusion_pytorch_model.safetensors"))
    removed = sorted(tensors)[5]
    del tensors[removed]
    tensors["decoder.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "vae"
    broken.mkdir()
    save_file(tensors, str(broken / "diffusion_pytorch_model.safetensors"))
    shutil.copy(tiny_root / "vae" / "config.json", broken / "config.json")
    assert cli.main(["inspect", str(broken), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing_keys"] == [removed] and report["unexpected_keys"] == ["decoder.extra.weight"]


def test_download_fetches_each_component_once(tmp_path, monkeypatch, capsys, tiny_root):
    calls = []

    def fake_snapshot_download(model_id, *, local_dir, allow_patterns, source):
        calls.append((model_id, tuple(allow_patterns or ()), source))
        # the tiny repo stands in for the hub: copy what the patterns ask for
        for pattern in allow_patterns:
            for path in tiny_root.glob(pattern):
                target = local_dir / path.relative_to(tiny_root)
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    shutil.copy(path, target)

    monkeypatch.setattr(weights, "snapshot_download_fn", fake_snapshot_download)
    args = ["download", "Qwen/Qwen-Image", "--local-model-path", str(tmp_path)]
    assert cli.main(args) == 0
    assert len(calls) == 4 and all(call[0] == "Qwen/Qwen-Image" and call[2] == "modelscope" for call in calls)
    assert (tmp_path / "Qwen/Qwen-Image/transformer/diffusion_pytorch_model.safetensors.index.json").exists()
    assert cli.main(args) == 0  # everything present and complete: no second download
    assert len(calls) == 4
    assert "transformer" in capsys.readouterr().out


def test_generate_with_placement_strategy_loads_on_host(models_dir, tmp_path, monkeypatch):
    import imagezoo

    seen = {}
    original = imagezoo.load

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(imagezoo, "load", recording)
    args = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "a.png"),
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--local-model-path",
        str(models_dir),
        "--device",
        "cpu",
    ]
    assert cli.main([*args, "--memory", "offload"]) == 0 and seen["build_on_host"] is True
    assert cli.main([*args, "--memory", "fp8"]) == 0 and seen["build_on_host"] is False
