"""Sharded full fine-tuning through the shipped FSDP accelerate config (needs a CUDA GPU; skipped elsewhere).

accelerate refuses FSDP on CPU, so CI (no GPU) skips this; it runs on the GPU machine with one process, which
exercises the same code: FSDP wrapping per block, sharded resumable states, gathered full-weight export, resume.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA GPU")

CONFIG = Path(__file__).resolve().parents[3] / "accelerate_configs" / "fsdp.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(models_dir: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-P", "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--num_processes", "1", "--main_process_port", str(_port()),
        "-m", "imagezoo.train", "--model", "tiny", "--local_model_path", str(models_dir),
        "--dataset_base_path", str(data), "--height", "64", "--width", "64", "--trainable_models", "dit",
        "--cache_text_embeddings", "--cache_latents", "--learning_rate", "1e-4", "--save_steps", "1",
        "--output_path", str(out), "--no-progress", "--use_gradient_checkpointing", *extra,
    ]  # fmt: skip
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_fsdp_full_training_saves_loadable_weights_and_resumes(make_dataset, fresh_tiny, models_dir, tmp_path):
    data = make_dataset(4)
    out = tmp_path / "fsdp"
    run = _train(models_dir, data, out, "--max_steps", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    state = load_file(str(out / "step-2.safetensors"))
    pipe = fresh_tiny()
    dit = pipe.components.modules["dit"]
    assert set(state) == set(dit.state_dict())
    assert (out / "training_state" / "step-2" / "trainer.json").is_file()

    run = _train(models_dir, data, out, "--max_steps", "3", "--resume_from", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Resumed from" in run.stderr and (out / "step-3.safetensors").is_file()

    from imagezoo.training.validate import load_full_checkpoint

    load_full_checkpoint(pipe, out / "step-3.safetensors")
    image = pipe("a red wave", height=64, width=64, num_inference_steps=2, seed=0, progress_bar_cmd=lambda s: s)
    assert image.size == (64, 64)
