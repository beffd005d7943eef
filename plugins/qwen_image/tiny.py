"""The embedded tiny Qwen-Image: random weights written deterministically in the official folder layout.

It exercises exactly the code paths of the real model (sharded DiT and text encoder with index files and
config.json, the VAE file, the tokenizer folder) in seconds, offline. Its images are meaningless by design.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagezoo.plugins.qwen_image.dit import TINY_DIT, QwenImageDiT
from imagezoo.plugins.qwen_image.text_encoder import TINY_TEXT_ENCODER
from imagezoo.plugins.qwen_image.tokenizer import write_offline_tokenizer
from imagezoo.plugins.qwen_image.vae import TINY_VAE, QwenImageVAE

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".imagezoo-complete"
TINY_SEED = 20250804
# scheduler/scheduler_config.json as published with Qwen/Qwen-Image
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def save_sharded(state_dict: Mapping[str, torch.Tensor], folder: Path, stem: str, num_shards: int) -> None:
    """Write `state_dict` as `{stem}-0000i-of-0000n.safetensors` shards plus `{stem}.safetensors.index.json`."""
    keys = list(state_dict)
    per_shard = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for index in range(num_shards):
        name = f"{stem}-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {key: state_dict[key].contiguous() for key in keys[index * per_shard : (index + 1) * per_shard]}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index_data, indent=2))


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _text_encoder_state_dict() -> dict[str, torch.Tensor]:
    """A tiny Qwen2.5-VL language model in the older published key layout (`model.*`, plus `lm_head`)."""
    from transformers import Qwen2_5_VLTextModel

    model = Qwen2_5_VLTextModel(TINY_TEXT_ENCODER.text_config())
    weights = {f"model.{key}": value for key, value in model.state_dict().items() if "rotary_emb" not in key}
    weights["lm_head.weight"] = torch.randn(TINY_TEXT_ENCODER.vocab_size, TINY_TEXT_ENCODER.hidden_size) * 0.02
    return weights


def write_tiny_checkpoint(root: Path, seed: int = TINY_SEED) -> None:
    """Write the tiny model's files under `root` (transformer/, text_encoder/, vae/, tokenizer/, scheduler/)."""
    torch.manual_seed(seed)
    for folder in ("transformer", "text_encoder", "vae", "scheduler"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    dit = QwenImageDiT(TINY_DIT)
    save_sharded(dit.state_dict(), root / "transformer", "diffusion_pytorch_model", num_shards=2)
    _write_json(root / "transformer" / "config.json", TINY_DIT.to_config())
    save_sharded(_text_encoder_state_dict(), root / "text_encoder", "model", num_shards=2)
    _write_json(root / "text_encoder" / "config.json", TINY_TEXT_ENCODER.to_config())
    vae = QwenImageVAE(TINY_VAE)
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()},
        str(root / "vae" / "diffusion_pytorch_model.safetensors"),
    )
    _write_json(root / "vae" / "config.json", TINY_VAE.to_config())
    write_offline_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)


def ensure_tiny_checkpoint(root: Path) -> Path:
    """Generate the tiny checkpoint at `root` unless a complete one is there; safe against concurrent callers."""
    root = Path(root)
    if (root / COMPLETE_MARKER).exists():
        return root
    logger.info("Writing the tiny random-weight Qwen-Image checkpoint to %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        write_tiny_checkpoint(staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        if root.exists():  # an incomplete earlier attempt
            shutil.rmtree(root)
        os.replace(staging, root)
    except FileExistsError:
        pass  # another process finished first; its copy is complete
    except OSError:
        if not (root / COMPLETE_MARKER).exists():
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
