"""Distill-Full: naming only the model ID fetches root-level DiT shards plus Qwen/Qwen-Image's other parts, and the
registry's defaults (15 steps, no CFG) apply."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imagezoo
from imagezoo import weights
from imagezoo.plugins.qwen_image.tiny import save_sharded

DISTILL = "DiffSynth-Studio/Qwen-Image-Distill-Full"
BASE = "Qwen/Qwen-Image"


class FakeHub:
    """Stands in for the modelscope download: copies the files of a repo that match the allow patterns."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos, self.calls = repos, []

    def __call__(self, model_id: str, *, local_dir: Path, allow_patterns: list[str] | None, source: str) -> None:
        self.calls.append((model_id, tuple(allow_patterns or ())))
        repo = self.repos[model_id]
        for src in sorted(repo.rglob("*")):
            rel = src.relative_to(repo).as_posix()
            if src.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (local_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, local_dir / rel)


class CountingDenoiser:
    """Records the batch size of every denoiser call."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.patch_size, self.batches = denoiser, denoiser.patch_size, []

    def __call__(self, latents, sigma, text):
        self.batches.append(latents.shape[0])
        return self.denoiser(latents, sigma, text)


@pytest.fixture(scope="module")
def hub(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Remote repos: Qwen/Qwen-Image (the tiny files) and a Distill-Full repo with its DiT shards at the root."""
    remote = tmp_path_factory.mktemp("hub")
    base = remote / "base"
    shutil.copytree(tiny_root, base)
    distill = remote / "distill"
    distill.mkdir()
    base_dit = {}
    for shard in sorted((tiny_root / "transformer").glob("*.safetensors")):
        base_dit.update(load_file(shard))
    distilled = {key: value + 0.01 for key, value in base_dit.items()}  # different weights, same keys
    save_sharded(distilled, distill, "diffusion_pytorch_model", num_shards=3)
    shutil.copyfile(tiny_root / "transformer" / "config.json", distill / "config.json")
    (distill / "configuration.json").write_text(json.dumps({"framework": "Pytorch", "task": "text-to-image"}))
    (distill / "README.md").write_text("Distill-Full\n")
    return {BASE: base, DISTILL: distill}


def test_only_the_model_id_gets_the_right_files_and_defaults(hub, tmp_path, monkeypatch):
    fake = FakeHub(hub)
    monkeypatch.setattr(weights, "snapshot_download_fn", fake)
    local = tmp_path / "models"
    pipe = imagezoo.load("distill-full", device="cpu", torch_dtype=torch.float32, local_model_path=local)

    downloaded = sorted(p.relative_to(local / DISTILL).as_posix() for p in (local / DISTILL).rglob("*") if p.is_file())
    assert downloaded == [
        "config.json",
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00002-of-00003.safetensors",
        "diffusion_pytorch_model-00003-of-00003.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    assert sorted(model_id for model_id, _ in fake.calls) == [DISTILL, BASE, BASE, BASE]  # one fetch per component
    assert (local / BASE / "text_encoder").is_dir() and (local / BASE / "tokenizer").is_dir()
    assert not (local / BASE / "transformer").exists()  # the base DiT is not fetched

    dit = pipe.components.modules["dit"]
    expected = load_file(hub[DISTILL] / "diffusion_pytorch_model-00001-of-00003.safetensors")
    for key, value in expected.items():
        assert torch.equal(dit.state_dict()[key], value), key

    assert pipe.entry.id == DISTILL
    assert (pipe.defaults.num_inference_steps, pipe.defaults.cfg_scale) == (15, 1.0)
    steps = []
    pipe.denoiser = counting = CountingDenoiser(pipe.denoiser)
    pipe(
        "a lighthouse",
        height=64,
        width=64,
        seed=0,
        progress_bar_cmd=lambda x: x,
        step_callback=lambda index, sigma, latents: steps.append(index),
    )
    assert steps == list(range(15))
    assert counting.batches == [1] * 15  # cfg 1: no negative pass
