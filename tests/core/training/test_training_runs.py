"""End-to-end training on the tiny model (CPU): LoRA overfits and loads, full checkpoints load, resume is exact,
two processes equal one, memory options keep the gradients, and bad data stops the run early."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagezoo.lora import detect_lora_format
from imagezoo.training.config import DEFAULT_LORA_TARGETS
from imagezoo.training.trainer import Trainer

QUIET = {"progress_bar_cmd": lambda steps: steps}


def _generate(pipe, seed=0):
    return pipe("a red wave", height=64, width=64, num_inference_steps=2, seed=seed, output_type="latent", **QUIET)


def test_lora_overfits_four_images_and_the_saved_file_reproduces_it(make_dataset, wide_tiny, tmp_path, train_config):
    data = make_dataset(4)
    pipe = wide_tiny(0)
    config = train_config(
        data,
        tmp_path / "out",
        lora_base_model="dit",
        lora_rank=16,
        # The patch embedding and output projection too: the tiny model's residual stream is random and narrow.
        lora_target_modules=DEFAULT_LORA_TARGETS + ",proj_out,img_in",
        learning_rate=1e-2,
        batch_size=4,
        num_epochs=60,
        save_steps=60,
        save_training_state=False,
        cache_text_embeddings=True,
        cache_latents=True,
    )
    result = Trainer(config, pipeline=pipe).run()
    losses = result.losses
    assert len(losses) == 60 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last <= 0.5 * first, (first, last)

    path = tmp_path / "out" / "step-60.safetensors"
    assert result.checkpoints == [path]
    state = load_file(str(path))
    assert detect_lora_format(state) == "diffsynth"
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in state and "proj_out.lora_B.default.weight" in state
    assert not any(k.startswith("pipe.") for k in state)  # --remove_prefix_in_ckpt pipe.dit. (the default)

    fresh = wide_tiny(0)
    base = _generate(fresh)
    fresh.load_lora(str(path))
    loaded = _generate(fresh)
    trained = _generate(pipe)
    assert (loaded - base).abs().max() > 1e-2  # the LoRA changes the image
    assert torch.allclose(loaded, trained, atol=1e-4)  # and reproduces the trained model


def test_opensource_format_and_validation_images(make_dataset, fresh_tiny, tmp_path, train_config):
    data = make_dataset(2)
    config = train_config(
        data,
        tmp_path / "out",
        lora_base_model="dit",
        lora_rank=4,
        max_steps=2,
        save_steps=2,
        align_to_opensource_format=True,
        cache_text_embeddings=True,
        validation_prompts=["a red wave", "blue"],
        validation_steps=2,
        validation_num_inference_steps=2,
    )
    result = Trainer(config, pipeline=fresh_tiny()).run()
    state = load_file(str(result.checkpoints[0]))
    assert detect_lora_format(state) == "comfyui"
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert not any(".default." in k for k in state)
    images = sorted(p.name for p in (tmp_path / "out" / "validation").iterdir())
    assert images == ["step-0-0.png", "step-0-1.png", "step-2-0.png", "step-2-1.png"]  # before training, then every 2
    fresh = fresh_tiny()
    fresh.load_lora(str(result.checkpoints[0]))  # the keys ComfyUI uses load here too


def test_full_training_checkpoint_loads_into_the_pipeline(make_dataset, fresh_tiny, models_dir, tmp_path):
    from imagezoo.cli import main as cli_main
    from imagezoo.train import main as train_main

    data = make_dataset(2)
    out = tmp_path / "full"
    common = ["--model", "tiny", "--local_model_path", str(models_dir), "--dataset_base_path", str(data)]
    status = train_main(
        [*common, "--height", "64", "--width", "64", "--trainable_models", "dit", "--learning_rate", "1e-3",
         "--output_path", str(out), "--no-progress", "--use_gradient_checkpointing"]
    )  # fmt: skip
    assert status == 0
    path = out / "epoch-0.safetensors"
    state = load_file(str(path))
    original = fresh_tiny()
    dit_keys = set(original.components.modules["dit"].state_dict())
    assert set(state) == dit_keys  # every DiT tensor, prefix removed: loads as a full DiT checkpoint
    changed = [k for k in state if not torch.equal(state[k], original.components.modules["dit"].state_dict()[k])]
    assert "transformer_blocks.0.attn.to_q.weight" in changed
    assert "transformer_blocks.1.attn.to_add_out.weight" not in changed  # never gets a gradient: frozen

    from imagezoo.training.validate import load_full_checkpoint

    load_full_checkpoint(original, path)
    assert torch.equal(original.components.modules["dit"].transformer_blocks[0].attn.to_q.weight,
                       state["transformer_blocks.0.attn.to_q.weight"])  # fmt: skip
    image = tmp_path / "val.png"
    status = cli_main(
        ["validate", "--model", "tiny", "--local_model_path", str(models_dir), "--checkpoint", str(path),
         "--prompt", "a red wave", "--height", "64", "--width", "64", "--num_inference_steps", "2",
         "--out", str(image)]
    )  # fmt: skip
    assert status == 0 and image.is_file()


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(make_dataset, fresh_tiny, tmp_path, train_config):
    data = make_dataset(4)
    settings = {
        "lora_base_model": "dit",
        "lora_rank": 4,
        "learning_rate": 5e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 1,
        "gradient_accumulation_steps": 2,
        "num_epochs": 2,
        "save_steps": 1,
    }
    full = Trainer(train_config(data, tmp_path / "a", **settings), pipeline=fresh_tiny()).run()
    assert full.global_step == 4 and not full.interrupted

    def stop(step: int, module) -> None:
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-step

    out = tmp_path / "b"
    first = Trainer(train_config(data, out, **settings), pipeline=fresh_tiny(), grad_callback=stop).run()
    assert first.interrupted and first.global_step == 1
    assert first.state_folder == out / "training_state" / "step-1"
    resumed = Trainer(train_config(data, out, resume_from=str(out), **settings), pipeline=fresh_tiny()).run()
    assert resumed.global_step == 4 and not resumed.interrupted
    assert np.allclose(resumed.losses, full.losses[1:], rtol=1e-5)
    expected = load_file(str(tmp_path / "a" / "step-4.safetensors"))
    got = load_file(str(out / "step-4.safetensors"))
    assert set(expected) == set(got)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    states = sorted(p.name for p in (out / "training_state").iterdir())
    assert states == ["latest", "step-4"]  # older states pruned (--keep_training_states 1)


def _grads(make_dataset, fresh_tiny, train_config, tmp_path, **settings):
    grads = {}

    def keep(step, module):
        grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})

    data = make_dataset(2)
    config = train_config(
        data, tmp_path / "g", lora_base_model="dit", lora_rank=4, max_steps=1, batch_size=2, save_training_state=False,
        **settings,
    )  # fmt: skip
    Trainer(config, pipeline=fresh_tiny(), grad_callback=keep).run()
    return grads


@pytest.mark.parametrize(
    "settings",
    [
        {"use_gradient_checkpointing": True},
        {"use_gradient_checkpointing": True, "use_gradient_checkpointing_offload": True},
        {"offload_frozen_blocks": -1, "use_gradient_checkpointing": True},
        {"offload_frozen_blocks": 1, "use_gradient_checkpointing": True},
        {"cache_text_embeddings": True, "cache_latents": True},
        {"attention_backend": "math"},
    ],
)
def test_memory_options_keep_the_gradients(make_dataset, fresh_tiny, train_config, tmp_path, settings):
    reference = _grads(make_dataset, fresh_tiny, train_config, tmp_path / "r")
    grads = _grads(make_dataset, fresh_tiny, train_config, tmp_path / "m", **settings)
    assert set(grads) == set(reference) and len(grads) > 0
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_gradients_of_one_with_the_combined_batch(make_dataset, models_dir, tmp_path):
    data = make_dataset(4)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.safetensors"
    launch = [sys.executable, "-P", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # fmt: skip
    command = [*launch, str(worker), str(models_dir), str(data), str(two), "1", "2"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = tmp_path / "one.safetensors"
    run = subprocess.run(
        [sys.executable, "-P", str(worker), str(models_dir), str(data), str(one), "2", "1"],
        env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(str(two)), load_file(str(one))
    assert set(a) == set(b) and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7)


def test_bad_dataset_stops_before_loading_models(tmp_path, images, caplog):
    from imagezoo.train import main as train_main

    images(tmp_path, 1)
    (tmp_path / "metadata.csv").write_text("image,prompt\nimg0.png,ok\nmissing.jpg,not ok\n")
    status = train_main(["--model", "no-such-model", "--dataset_base_path", str(tmp_path), "--lora_base_model", "dit"])
    assert status == 2
    assert "metadata.csv line 3" in caplog.text and "missing.jpg" in caplog.text


@pytest.mark.parametrize("component", ["text_encoder", "vae"])
def test_full_training_of_the_encoders_reaches_their_weights(
    make_dataset, fresh_tiny, tmp_path, component, train_config
):
    grads = {}

    def keep(step, module):
        grads.update({n: p.grad for n, p in module.named_parameters() if p.requires_grad})

    config = train_config(make_dataset(2), tmp_path / "enc", trainable_models=component, max_steps=1, batch_size=2,
                          learning_rate=1e-4, save_training_state=False)  # fmt: skip
    Trainer(config, pipeline=fresh_tiny(), grad_callback=keep).run()
    assert grads and all(name.startswith(f"models.{component}.") for name in grads)
    assert all(g is not None for g in grads.values())  # every trainable parameter gets a gradient (DDP-safe)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_eligen_entities_from_json_metadata_train(tmp_path, images, fresh_tiny, train_config):
    import json

    from PIL import Image

    images(tmp_path, 1)
    for i, box in enumerate([(0, 0, 32, 64), (32, 0, 64, 64)]):  # left and right halves, white = the entity
        mask = Image.new("RGB", (64, 64))
        mask.paste((255, 255, 255), box)
        mask.save(tmp_path / f"mask{i}.png")
    rows = [
        {
            "image": "img0.png",
            "prompt": "two things",
            "eligen_entity_prompts": ["a red thing", "a green thing"],
            "eligen_entity_masks": ["mask0.png", "mask1.png"],
        }
    ]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    seen = []
    pipe = fresh_tiny()
    dit = pipe.components.modules["dit"]
    dit.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    config = train_config(
        tmp_path, tmp_path / "out", lora_base_model="dit", lora_rank=4, max_steps=1, save_training_state=False,
        data_file_keys="image,eligen_entity_masks", extra_inputs="eligen_entity_prompts,eligen_entity_masks",
    )  # fmt: skip
    result = Trainer(config, pipeline=pipe).run()
    assert result.global_step == 1 and np.isfinite(result.losses[0])
    assert seen and seen[0] is not None and seen[0].dtype == torch.bool  # the entity attention mask reached the DiT
    bad = train_config(
        tmp_path, tmp_path / "o2", lora_base_model="dit", extra_inputs="eligen_entity_prompts", batch_size=2
    )
    with pytest.raises(Exception, match="--batch_size 1"):
        Trainer(bad, pipeline=fresh_tiny()).run()
