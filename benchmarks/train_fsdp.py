"""Sharded full fine-tuning (FSDP) of a reduced Qwen-Image DiT: s/step, samples/s, MFU and per-GPU peak memory.

The 8-GPU run of the whole 20B DiT (issue 8) needs a machine of 8 GPUs. This script measures what a smaller machine
allows, through the shipped `accelerate_configs/fsdp.yaml` and the real trainer:

1. Writes, under `--workdir` (the GPU machine's local disk), a checkpoint in the official Qwen-Image layout
   (`<workdir>/models/Qwen/Qwen-Image/{transformer,text_encoder,vae,tokenizer,scheduler}`, sharded safetensors with
   index files and `config.json`s) with a FULL-WIDTH DiT of `--blocks` blocks (width 3072, 24 heads, text_dim 3584),
   a text encoder of the real hidden size 3584 with one layer (real vocabulary and MLP width; `lm_head` left out: the
   loader drops it anyway), the real-size VAE and the offline tokenizer. Weights are bf16 and random: each tensor is a
   slice of one random pool at a random offset (std 0.02; biases 0, norm scales 1), which is fast to write; speed and
   memory do not depend on the values. Plus `--images` random-noise PNGs of `--size`² with `metadata.csv`.
2. Phase `fsdp-N`: full-parameter DiT training on `--gpus` processes, `accelerate launch --config_file
   accelerate_configs/fsdp.yaml --num_processes N`, batch 1 per process, `--size`², `--cache_text_embeddings
   --cache_latents`, gradient checkpointing, `--warmup` + `--steps` + 1 optimizer steps, a checkpoint with its
   sharded resumable state saved at the last step (`--save_steps`).
3. Phase `fsdp-1`: the same on one process with `--gradient_accumulation_steps N`, so the global batch (N) is the
   same and the per-GPU figures show what sharding saves (params, gradients and AdamW state ~1/N per GPU).
4. Phase `resume`: the plain CLI, `accelerate launch ... --num_processes N -m imagezoo.train ... --resume_from`,
   continues phase 2's run from its saved state for `--resume-steps` more steps.

The measured phases run `imagezoo.train`'s own code path (`parse_train_args`, then `Trainer(config).run()`) inside
this script's `--worker` mode, which only adds the trainer's documented `grad_callback`: at each optimizer step it
synchronizes the GPU, timestamps the step and reads `torch.cuda.max_memory_allocated` of its rank. Reported:

- `s_per_step`: median wall time between consecutive optimizer steps (forward, backward with recomputation, FSDP
  all-gathers and reduce-scatters, clipping, AdamW), after `--warmup` steps; `samples_per_s` = global batch / that.
- `peak_vram_gib`: the largest over ranks of `max_memory_allocated` at the last step (after the first step's peak
  was reset once the optimizer state exists, so it is the steady training peak: sharded fp32 params, grads and AdamW
  state, gathered bf16 units, activations). `peak_vram_gib_run` is the whole run, encoding the caches and the save
  included.
- `mfu`: model FLOPs per sample / s_per_step * global batch / (GPUs x peak dense bf16 FLOP/s, 989.4e12 for
  H100/H200 SXM). Model FLOPs per sample (training = 3x forward; the recomputation of gradient checkpointing is not
  counted, as usual for MFU): 6*(N_img*T_img + N_txt*T_txt) + 12*w*((L-1)*T^2 + T*T_img), where N_img and N_txt are
  the matmul weights that act on each image / text token (12 w^2 per block and stream, the last block's text stream
  only its key and value projections, 2 w^2; plus img_in, proj_out / txt_in), T_img = (size/16)^2, T_txt the mean
  prompt length in tokens (from the text cache), T = T_img + T_txt, w = 3072, L = blocks. Per-sample (not per-token)
  weights (modulation, timestep embedding) are left out.

    python benchmarks/train_fsdp.py                          # CUDA, 2 GPUs, 4 blocks, 1024x1024
    python benchmarks/train_fsdp.py --blocks 8 --gpus 4
    python benchmarks/train_fsdp.py --smoke                  # CPU plumbing check (see --smoke's help)

Writes `benchmarks/results/train_fsdp.json` (smoke: `$TMPDIR/train_fsdp_smoke.json`), rewritten after each phase so
a cut-off run leaves its figures; each phase's output goes to `<log-dir>/<phase>.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from report import versions, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp.yaml"
GIB = 1024**3
MODEL_ID = "Qwen/Qwen-Image"
# NVLink multicast stays off (shared machines; see the device notes): also in every child process.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Dense bf16 peak of one GPU (vendor datasheet, SXM), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
logger = logging.getLogger("benchmarks.train_fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU plumbing check: tiny widths, 64x64, fp32. accelerate refuses FSDP without GPUs, so the N-process "
        "phases run as CPU DDP (gloo) instead; the script's phases, parsing and report are what is checked",
    )
    parser.add_argument("--blocks", type=int, default=4, help="DiT blocks (the real model has 60)")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the sharded phases")
    parser.add_argument("--size", type=int, help="image side (default 1024; smoke 64)")
    parser.add_argument("--images", type=int, default=8, help="dataset rows (random-noise PNGs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--resume-steps", type=int, default=2, help="steps of the resumed run")
    parser.add_argument("--phases", default="fsdp-N,fsdp-1,resume", help="subset of fsdp-N, fsdp-1, resume")
    parser.add_argument("--workdir", type=Path, help="model, data, caches and checkpoints (default: a new temp dir)")
    parser.add_argument("--log-dir", type=Path, help="phase logs (default <workdir>/logs)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/train_fsdp.json)")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole script: phases that cannot fit are "
                        "skipped, a running one is stopped, and the JSON keeps what finished")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--worker REPORT -- TRAIN FLAGS...`: everything after `--` goes to imagezoo.train untouched.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.train_argv = argv[cut + 1 :]
    args.size = args.size or (64 if args.smoke else 1024)
    return args


# ------------------------------------------------------------------------------------------- model and dataset


class RandomPool:
    """Random bf16 values (std `std`), handed out as slices at random offsets: fills GBs of weights in seconds."""

    def __init__(self, size: int, std: float = 0.02, seed: int = 0) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(size, dtype=torch.float32).normal_(0.0, std, generator=self.generator)
        self.pool = self.pool.to(torch.bfloat16)

    def take(self, shape: tuple[int, ...]) -> Any:
        import torch

        numel, size = math.prod(shape), self.pool.numel()
        offset = int(torch.randint(0, size, (1,), generator=self.generator))
        rolled = torch.cat([self.pool[offset:], self.pool[:offset]]) if offset else self.pool
        reps = -(-numel // size)
        flat = rolled.repeat(reps)[:numel] if reps > 1 else rolled[:numel].clone()
        return flat.view(shape)


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], pool: RandomPool) -> dict[str, Any]:
    """Weights from the pool; biases 0; 1-d weights and the VAE's `gamma` (norm scales) 1."""
    import torch

    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            out[name] = torch.zeros(shape, dtype=torch.bfloat16)
        elif leaf == "gamma" or len(shape) == 1:
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = pool.take(shape)
    return out


def model_params(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from imagezoo.plugins.qwen_image.dit import DiTParams
    from imagezoo.plugins.qwen_image.text_encoder import TINY_TEXT_ENCODER, TextEncoderParams
    from imagezoo.plugins.qwen_image.vae import REAL_VAE, TINY_VAE

    if args.smoke:
        # Tiny widths (head_dim 16), text_dim = the tiny text encoder's width.
        dit = DiTParams(num_layers=args.blocks, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))
        return dit, TINY_TEXT_ENCODER, TINY_VAE
    return DiTParams(num_layers=args.blocks), TextEncoderParams(num_layers=1), REAL_VAE


def write_checkpoint(root: Path, dit_params: Any, te_params: Any, vae_params: Any) -> dict[str, int]:
    """The official layout with random bf16 weights; returns parameter counts per component."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLTextModel

    from imagezoo.plugins.qwen_image.dit import QwenImageDiT
    from imagezoo.plugins.qwen_image.tiny import SCHEDULER_CONFIG, save_sharded
    from imagezoo.plugins.qwen_image.tokenizer import write_offline_tokenizer
    from imagezoo.plugins.qwen_image.vae import QwenImageVAE

    def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in module.state_dict().items()}

    with torch.device("meta"):
        dit_shapes = shapes(QwenImageDiT(dit_params))
        te_model = Qwen2_5_VLTextModel(te_params.text_config())
        te_shapes = {f"model.{k}": s for k, s in shapes(te_model).items() if "rotary_emb" not in k}
        vae_shapes = shapes(QwenImageVAE(vae_params))
    pool = RandomPool(1 << 24)
    for folder in ("transformer", "text_encoder", "vae", "scheduler"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, folder, stem, table, config in (
        ("dit", "transformer", "diffusion_pytorch_model", dit_shapes, dit_params.to_config()),
        ("text_encoder", "text_encoder", "model", te_shapes, te_params.to_config()),
    ):
        weights = random_state_dict(table, pool)
        save_sharded(weights, root / folder, stem, num_shards=2)
        (root / folder / "config.json").write_text(json.dumps(config, indent=2))
        counts[name] = sum(t.numel() for t in weights.values())
        del weights
    vae = random_state_dict(vae_shapes, pool)
    save_file(vae, str(root / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "vae" / "config.json").write_text(json.dumps(vae_params.to_config(), indent=2))
    counts["vae"] = sum(t.numel() for t in vae.values())
    write_offline_tokenizer(root / "tokenizer")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    return counts


def write_dataset(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["image,prompt"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
        lines.append(f'noise{i}.png,"random noise image number {i}, a test of sharded training"')
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------- worker


def worker(report: Path, train_argv: list[str]) -> int:
    """`python -m imagezoo.train` (parse, then `Trainer(config).run()`) plus a timing / memory `grad_callback`."""
    import torch

    from imagezoo.errors import ImagezooError
    from imagezoo.training.config import parse_train_args
    from imagezoo.training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    marks: list[float] = []
    memory: dict[str, float] = {}

    def on_step(step: int, module: torch.nn.Module) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if not cuda:
            return
        if step == 1:
            # From here on the peak is the steady one: the optimizer state is allocated in step 1's update.
            memory["peak_until_step1_gib"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        memory["peak_train_gib"] = torch.cuda.max_memory_allocated() / GIB
        memory["allocated_at_last_step_gib"] = torch.cuda.memory_allocated() / GIB

    start = time.perf_counter()
    try:
        config = parse_train_args(train_argv)
        trainer = Trainer(config, grad_callback=on_step)
        result = trainer.run()
    except ImagezooError as exc:
        logger.error("%s", exc)
        return 2
    end = time.perf_counter()
    accelerator = trainer.accelerator
    rank = accelerator.process_index
    data = {
        "rank": rank,
        "world": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "global_step": result.global_step,
        "losses": result.losses,
        "step_times": [b - a for a, b in itertools.pairwise(marks)],
        "setup_s": (marks[0] - start) if marks else None,
        "after_last_step_s": (end - marks[-1]) if marks else None,
        "wall_s": end - start,
        "checkpoints": [str(p) for p in result.checkpoints],
        "state_folder": str(result.state_folder) if result.state_folder else None,
        **memory,
    }
    if cuda:
        data["peak_run_gib"] = max(torch.cuda.max_memory_allocated() / GIB, memory.get("peak_until_step1_gib", 0.0))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_name(f"{report.name}.rank{rank}.json").write_text(json.dumps(data, indent=2))
    return 130 if result.interrupted else 0


# ------------------------------------------------------------------------------------------------- phases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(smoke: bool) -> dict[str, str]:
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return env


def launch_prefix(args: argparse.Namespace, processes: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.smoke:
        # accelerate refuses FSDP without GPUs: CPU DDP (gloo) stands in to exercise the plumbing.
        multi = ["--multi_gpu"] if processes > 1 else []
        return [*launch, *multi, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    return [*launch, "--config_file", str(FSDP_CONFIG), "--num_processes", str(processes),
            "--main_process_port", str(free_port())]  # fmt: skip


def train_flags(args: argparse.Namespace, work: Path, output: Path, **extra: Any) -> list[str]:
    flags = {
        "model": MODEL_ID,
        "local_model_path": work / "models",
        "dataset_base_path": work / "data",
        "height": args.size,
        "width": args.size,
        "dataset_repeat": 100,
        "trainable_models": "dit",
        "learning_rate": 1e-5,
        "batch_size": 1,
        "cache_dir": work / "cache",
        "output_path": output,
        "seed": 0,
        **extra,
    }
    argv = ["--skip_download", "--cache_text_embeddings", "--cache_latents", "--use_gradient_checkpointing",
            "--no-progress"]  # fmt: skip
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()


def run_logged(command: list[str], log: Path, env: dict[str, str], timeout: float | None) -> tuple[int, float, str]:
    """Run `command` in its own process group, output to `log` and ours; kill the group on timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                handle.write(line)
                handle.flush()
                print(f"  | {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        if timed_out:
            handle.write(f"\n[benchmark] stopped after {timeout:.0f} s\n")
    text = log.read_text(errors="replace")
    return (124 if timed_out else proc.returncode), time.perf_counter() - start, text


def read_reports(report: Path) -> list[dict[str, Any]]:
    files = sorted(report.parent.glob(f"{report.name}.rank*.json"))
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


def text_tokens(cache: Path) -> float | None:
    """Mean prompt length (tokens) of the cached text embeddings."""
    from safetensors import safe_open

    lengths = []
    for path in sorted(cache.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if "text_mask" in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                lengths.append(float(handle.get_tensor("text_mask").sum()))
    return statistics.mean(lengths) if lengths else None


def flops_per_sample(dit: Any, size: int, t_txt: float) -> dict[str, float]:
    """Model FLOPs of one training sample (forward + backward, no recomputation); see the module docstring."""
    w, layers = dit.width, dit.num_layers
    t_img = (size // (8 * dit.patch_size)) ** 2
    stream = 12 * w * w  # q, k, v, out (4 w^2) + MLP w -> 4w -> w (8 w^2)
    n_img = layers * stream + dit.in_channels * w + w * dit.patch_size**2 * dit.out_channels
    n_txt = (layers - 1) * stream + 2 * w * w + dit.text_dim * w
    total = t_img + t_txt
    dense = 6 * (n_img * t_img + n_txt * t_txt)
    attention = 12 * w * ((layers - 1) * total * total + total * t_img)
    return {
        "image_tokens": t_img,
        "text_tokens": t_txt,
        "per_token_weights_image": n_img,
        "per_token_weights_text": n_txt,
        "dense_flops": dense,
        "attention_flops": attention,
        "flops_per_sample": dense + attention,
    }


def peak_flops(device: str) -> float | None:
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in device), None)


def measured_row(
    args: argparse.Namespace, processes: int, accum: int, reports: list[dict[str, Any]], flops: dict[str, Any] | None
) -> dict[str, Any]:
    main = reports[0]
    times = main["step_times"][args.warmup :]
    global_batch = processes * accum  # batch 1 per process and micro-step
    row: dict[str, Any] = {
        "impl": "imagezoo",
        "case": {
            "gpus": processes,
            "blocks": args.blocks,
            "height": args.size,
            "width": args.size,
            "micro_batch": 1,
            "gradient_accumulation_steps": accum,
            "global_batch": global_batch,
            "gradient_checkpointing": True,
            "distributed_type": main["distributed_type"],
        },
        "s_per_step": statistics.median(times) if times else None,
        "s_per_step_mean": statistics.mean(times) if times else None,
        "steps_timed": len(times),
        "peak_vram_gib": None,
        "samples_per_s": None,
        "mfu": None,
    }
    if row["s_per_step"]:
        row["samples_per_s"] = global_batch / row["s_per_step"]
    if "peak_train_gib" in main:
        row["peak_vram_gib"] = max(r["peak_train_gib"] for r in reports)
        row["peak_vram_gib_per_rank"] = [r["peak_train_gib"] for r in reports]
        row["peak_vram_gib_run_per_rank"] = [r.get("peak_run_gib") for r in reports]
        row["allocated_gib_per_rank"] = [r.get("allocated_at_last_step_gib") for r in reports]
    peak = peak_flops(main["device"])
    if flops and peak and row["s_per_step"]:
        achieved = flops["flops_per_sample"] * global_batch / row["s_per_step"]
        row["model_tflops_per_s_per_gpu"] = achieved / processes / 1e12
        row["mfu"] = achieved / (processes * peak)
    losses = main["losses"]
    row.update(
        losses=losses,
        loss_finite=all(math.isfinite(v) for v in losses),
        global_step=main["global_step"],
        setup_s=main["setup_s"],
        after_last_step_s=main["after_last_step_s"],
        trainer_wall_s=main["wall_s"],
    )
    return row


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.train_argv)
    deadline = Deadline(args.time_limit)
    os.environ.update(NO_MULTICAST)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imagezoo-fsdp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = args.log_dir or work / "logs"
    smoke_out = Path(tempfile.gettempdir()) / "train_fsdp_smoke.json"
    out = args.out or (smoke_out if args.smoke else RESULTS / "train_fsdp.json")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    n = args.gpus
    dit_params, te_params, vae_params = model_params(args)
    result: dict[str, Any] = {
        "name": "train_fsdp",
        "gpu": None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions("imagezoo", "accelerate", "transformers", "safetensors"),
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/train_fsdp.py", *argv])]),
        "setup": {
            "smoke": args.smoke,
            "workdir": str(work),
            "dit": {
                "blocks": dit_params.num_layers,
                "width": dit_params.width,
                "heads": dit_params.num_heads,
                "text_dim": dit_params.text_dim,
            },
            "text_encoder": {
                "hidden_size": te_params.hidden_size,
                "layers": te_params.num_layers,
                "intermediate_size": te_params.intermediate_size,
            },
            "vae": "real size" if not args.smoke else "tiny",
            "size": args.size,
            "images": args.images,
            "warmup": args.warmup,
            "steps": args.steps,
            "launch": "CPU DDP (gloo): accelerate has no CPU FSDP" if args.smoke else "accelerate_configs/fsdp.yaml",
        },
        "mfu_formula": (
            "model FLOPs/sample = 6*(N_img*T_img + N_txt*T_txt) + 12*w*((L-1)*T^2 + T*T_img) (forward+backward, "
            "recomputation not counted); mfu = FLOPs/sample * global_batch / s_per_step / (GPUs * 989.4e12)"
        ),
        "rows": [],
        "phases": {},
    }

    def save() -> None:
        write_json(out, result)

    def timeout(reserve: float = 5.0) -> float | None:
        left = deadline.left()
        return None if left is None else left - reserve

    # ---- 1. model and data
    t0 = time.perf_counter()
    try:
        root = work / "models" / MODEL_ID
        if not (root / ".complete").exists():
            if root.exists():
                shutil.rmtree(root)
            counts = write_checkpoint(root, dit_params, te_params, vae_params)
            (root / ".complete").write_text(json.dumps(counts))
        counts = json.loads((root / ".complete").read_text())
        write_dataset(work / "data", args.images, args.size)
        result["setup"]["params"] = counts
        result["setup"]["write_s"] = time.perf_counter() - t0
        print(f"wrote the checkpoint ({counts}) and dataset in {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as exc:
        traceback.print_exc()
        result["setup"]["error"] = f"{type(exc).__name__}: {exc}"[:500]
        save()
        return 1
    save()

    env = child_env(args.smoke)
    script = str(Path(__file__).resolve())
    max_steps = args.warmup + args.steps + 1
    flops: dict[str, Any] | None = None
    status = 0
    run_a = work / "run-sharded"

    def measured(name: str, processes: int, accum: int, output: Path, **extra: Any) -> None:
        nonlocal flops, status
        left = timeout()
        if left is not None and left < 20:
            result["phases"][name] = {"skipped": f"{left:.0f} s left"}
            status = 1
            return
        report = work / "reports" / name
        flags = train_flags(args, work, output, gradient_accumulation_steps=accum, max_steps=max_steps, **extra)
        command = [*launch_prefix(args, processes), script, "--worker", str(report), "--", *flags]
        rc, wall, _ = run_logged(command, logs / f"{name}.log", env, left)
        info: dict[str, Any] = {"returncode": rc, "wall_s": wall, "command": shlex.join(command)}
        reports = read_reports(report)
        if rc != 0 or not reports:
            info["error"] = "timed out" if rc == 124 else f"exit status {rc}; see {logs / (name + '.log')}"
            status = 1
        if reports:
            if flops is None:
                tokens = text_tokens(work / "cache")
                flops = flops_per_sample(dit_params, args.size, tokens) if tokens is not None else None
                result["flops"] = flops
            result["gpu"] = result["gpu"] or (f"{reports[0]['device']} x{n}" if not args.smoke else "cpu")
            row = measured_row(args, processes, accum, reports, flops)
            row["case"]["phase"] = name
            row["wall_s"] = wall
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        result["phases"][name] = info
        save()

    if "fsdp-N" in phases:
        # Saves weights + the sharded resumable state at the last step, for the resume phase.
        measured(f"fsdp-{n}", n, 1, run_a, save_steps=max_steps)
    if "fsdp-1" in phases:
        # Same global batch through accumulation; only the weights are saved at the end (the trainer always saves).
        measured("fsdp-1", 1, n, work / "run-single", save_steps=max_steps, save_training_state=False)
    if "resume" in phases:
        name = "resume"
        left = timeout()
        state = run_a / "training_state" / f"step-{max_steps}"
        if not state.is_dir():
            result["phases"][name] = {"skipped": f"no saved state {state}"}
            status = 1
        elif left is not None and left < 20:
            result["phases"][name] = {"skipped": f"{left:.0f} s left"}
            status = 1
        else:
            total = max_steps + args.resume_steps
            flags = train_flags(args, work, run_a, max_steps=total, save_steps=max_steps, resume_from=run_a,
                                save_training_state=False)  # fmt: skip
            command = [*launch_prefix(args, n), "-m", "imagezoo.train", *flags]
            rc, wall, text = run_logged(command, logs / "resume.log", env, left)
            final = run_a / f"step-{total}.safetensors"
            stopped = [line for line in text.splitlines() if "Training stopped at step" in line]
            info = {
                "returncode": rc,
                "wall_s": wall,
                "command": shlex.join(command),
                "resumed_from": str(state),
                "resumed": "Resumed from" in text,
                "final_checkpoint": final.name if final.is_file() else None,
                "trainer_said": stopped[-1].split(": ", 1)[-1] if stopped else None,
            }
            info["ok"] = rc == 0 and info["resumed"] and info["final_checkpoint"] is not None
            if not info["ok"]:
                status = 1
            result["phases"][name] = info
            save()
            print(json.dumps(info), flush=True)

    print_table(result["rows"])
    save()
    print(f"wrote {out}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return status


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'gpus':>4} {'blocks':>6} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9} {'mfu':>6}"
    print(header)
    print("-" * len(header))

    def fmt(value: Any, spec: str) -> str:
        return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)

    for row in rows:
        case = row["case"]
        print(
            f"{case['gpus']:>4} {case['blocks']:>6} {fmt(row['s_per_step'], '8.3f')} "
            f"{fmt(row['samples_per_s'], '10.2f')} {fmt(row['peak_vram_gib'], '9.2f')} {fmt(row['mfu'], '6.3f')}"
        )


if __name__ == "__main__":
    sys.exit(main())
