"""Run by `test_training_runs.py` under `accelerate launch`: a short LoRA run that saves step 1's gradients.

Usage: ddp_worker.py MODELS_DIR DATASET OUTPUT_FILE BATCH_SIZE PROCESSES
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

import imagezoo
from imagezoo.training import make_config
from imagezoo.training.trainer import Trainer


def main() -> None:
    models_dir, dataset, out, batch_size, processes = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    config = make_config(
        {
            "model": "tiny",
            "dataset_base_path": dataset,
            "height": 64,
            "width": 64,
            "lora_base_model": "dit",
            "lora_rank": 4,
            "batch_size": batch_size,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "output_path": out + ".run",
            "progress": False,
            "save_training_state": False,
            "seed": 7,
        }
    )
    grads: dict[str, torch.Tensor] = {}

    def keep(step: int, module: torch.nn.Module) -> None:
        if step == 1:
            grads.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

    trainer = Trainer(config, pipeline=pipe, grad_callback=keep)
    assert trainer.accelerator.num_processes == processes, trainer.accelerator.num_processes
    result = trainer.run()
    if trainer.accelerator.is_main_process:
        assert result.global_step == 2, result.global_step
        save_file(grads, out)


if __name__ == "__main__":
    main()
