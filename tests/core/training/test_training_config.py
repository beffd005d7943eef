"""Training settings: every seed flag is accepted with its meaning, YAML configs, precedence, and named errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imagezoo.errors import ConfigError
from imagezoo.training.config import SEED_FLAGS, build_parser, parse_train_args

SEED_COMMAND = [
    "--dataset_base_path", "data/example_image_dataset",
    "--dataset_metadata_path", "data/example_image_dataset/metadata.csv",
    "--max_pixels", "1048576",
    "--height", "1328",
    "--width", "1328",
    "--data_file_keys", "image",
    "--dataset_repeat", "50",
    "--dataset_num_workers", "2",
    "--model_paths", '[["m/transformer/a.safetensors", "m/transformer/b.safetensors"], "m/vae/v.safetensors"]',
    "--model_id_with_origin_paths", "Qwen/Qwen-Image:text_encoder/model*.safetensors",
    "--tokenizer_path", "m/tokenizer",
    "--learning_rate", "1e-4",
    "--num_epochs", "5",
    "--output_path", "./models/train/Qwen-Image_lora",
    "--remove_prefix_in_ckpt", "pipe.dit.",
    "--save_steps", "100",
    "--find_unused_parameters",
    "--trainable_models", "text_encoder",
    "--lora_base_model", "dit",
    "--lora_target_modules", "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2",
    "--lora_rank", "32",
    "--extra_inputs", "eligen_entity_prompts,eligen_entity_masks",
    "--use_gradient_checkpointing",
    "--use_gradient_checkpointing_offload",
    "--gradient_accumulation_steps", "4",
    "--align_to_opensource_format",
]  # fmt: skip


def test_every_seed_flag_parses_with_its_meaning():
    given = {SEED_COMMAND[i].lstrip("-") for i in range(len(SEED_COMMAND)) if SEED_COMMAND[i].startswith("--")}
    assert given == set(SEED_FLAGS)
    config = parse_train_args(SEED_COMMAND)
    assert config.height == config.width == 1328 and config.dataset_repeat == 50 and config.num_epochs == 5
    assert config.model_paths == [["m/transformer/a.safetensors", "m/transformer/b.safetensors"], "m/vae/v.safetensors"]
    assert config.trainable_list == ["text_encoder"] and config.lora_base_model == "dit"
    assert config.lora_targets[-1] == "img_mlp.net.2" and config.lora_rank == 32 and config.alpha == 32.0
    assert config.extra_input_list == ["eligen_entity_prompts", "eligen_entity_masks"]
    assert config.use_gradient_checkpointing and config.use_gradient_checkpointing_offload
    assert config.find_unused_parameters and config.align_to_opensource_format
    assert config.gradient_accumulation_steps == 4 and config.save_steps == 100 and config.learning_rate == 1e-4


def test_yaml_config_with_flags_overriding(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "dataset_base_path: data\nmodel: tiny\nlora_base_model: dit\nlora_rank: 8\nlearning_rate: 0.001\n"
        "validation_prompts: [a cat, a dog]\n"
    )
    config = parse_train_args(["--config", str(path), "--lora_rank", "4"])
    assert config.lora_rank == 4 and config.learning_rate == 1e-3 and config.model == "tiny"
    assert config.validation_prompts == ["a cat", "a dog"]
    assert config.remove_prefix_in_ckpt == "pipe.dit." and config.max_pixels == 1024 * 1024


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "64"], "give both --height and --width"),
        (["--height", "72", "--width", "64"], "height=72 must be a multiple of 16"),
        (["--trainable_models", "unet"], "unknown model 'unet'"),
        (["--lora_base_model", ""], "nothing to train"),
        (["--lora_rank", "0"], "lora_rank"),
        (["--model_paths", "not json"], "--model_paths must be JSON"),
        (["--trainable_models", "dit", "--lora_base_model", "dit"], "train it fully or with LoRA, not both"),
        (["--cache_latents", "--trainable_models", "vae"], "--cache_latents cannot be used while training the vae"),
    ],
)
def test_bad_settings_name_the_setting(args, message):
    base = ["--dataset_base_path", "d", "--model", "tiny"]
    if "--lora_base_model" not in args and "--trainable_models" not in args:
        base += ["--lora_base_model", "dit"]
    with pytest.raises(ConfigError, match=message):
        parse_train_args(base + args)


def test_unknown_key_in_config_file_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dataset_base_path": "d", "model": "tiny", "lora_base_model": "dit", "lr": 1}))
    with pytest.raises(ConfigError, match=r"lr: Extra inputs are not permitted"):
        parse_train_args(["--config", str(path)])


def test_cli_subcommand_and_module_entry_accept_the_seed_flags():
    from imagezoo.cli import build_parser as cli_parser

    args = cli_parser().parse_args(["train", *SEED_COMMAND])
    assert args.lora_rank == 32 and args.use_gradient_checkpointing is True
    help_text = build_parser().format_help()
    assert all(f"--{flag}" in help_text for flag in SEED_FLAGS)
    out = subprocess.run([sys.executable, "-P", "-m", "imagezoo.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--lora_target_modules" in out.stdout and "--config" in out.stdout
