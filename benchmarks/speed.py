"""Speed of Qwen-Image inference on one GPU: imagezoo's speed options against diffusers, in the same process.

Weights are random (built on the meta device, allocated on the GPU with `to_empty`, filled in place: no download, no
disk), full size, bf16. diffusers' modules are built on the meta device and given the *same* tensors, so both
implementations run the same numbers and the reference costs no extra weight memory.

Sections (`--sections`, default all):
    attention  attention kernels at the DiT's shapes (dense, key-padded CFG batch), cuDNN against sequence length
    gemm       bf16 vs FP8 matmuls at the block's linear shapes
    overlap    one block's GEMMs of both streams: in sequence, with fused q/k/v, text on a second CUDA stream
    dit        one DiT forward: diffusers, imagezoo eager, imagezoo `exact` profile (compiled), `fp8` profile
    recompile  compiles after warm-up over 3 resolutions x 3 prompt lengths (exact profile)
    profile    GPU-busy share and kernel-time breakdown of one forward (is there a launch gap for CUDA graphs?)
    pipeline   text encoding + N steps with CFG + VAE decode: diffusers, imagezoo exact / cache / fp8 / fastest,
               with final-latent relative error and decoded-image PSNR against imagezoo exact on the same noise

    python benchmarks/speed.py                              # CUDA: everything -> benchmarks/results/speed.json
    python benchmarks/speed.py --sections dit recompile     # a subset
    python benchmarks/speed.py --tiny --device cpu          # smoke check of every code path (tiny model)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from report import rerun_command, versions, write_json

from imagezoo.interfaces import Components
from imagezoo.plugins.qwen_image import fused, speed
from imagezoo.plugins.qwen_image.dit import REAL_DIT, TINY_DIT, DiTParams, QwenImageDiT, pack_latents, unpack_latents
from imagezoo.plugins.qwen_image.family import QwenDenoiser
from imagezoo.plugins.qwen_image.text_encoder import REAL_TEXT_ENCODER, TINY_TEXT_ENCODER, QwenTextEncoder
from imagezoo.plugins.qwen_image.tiny import SCHEDULER_CONFIG
from imagezoo.plugins.qwen_image.tokenizer import load_tokenizer, write_offline_tokenizer
from imagezoo.plugins.qwen_image.vae import REAL_VAE, TINY_VAE, QwenImageVAE

logger = logging.getLogger("benchmarks.speed")
RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("attention", "gemm", "overlap", "dit", "recompile", "profile", "pipeline")
PIPELINE_VARIANTS = ("diffusers", "cache", "fp8", "fastest")
GIB = 1024**3
PROMPT = (
    "A sunlit workshop full of antique clocks: brass gears spread across an oak bench, a grey cat asleep beside a "
    "cup of tea, dust floating in the light from a tall window, a hand-painted sign reading 'Repairs while you "
    "wait', shelves of pocket watches, a map of the old town pinned to the wall, warm colours, soft shadows, "
    "35mm film photograph, shallow depth of field, high detail, calm and nostalgic mood"
)

NEGATIVE = " "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, small sizes: a smoke check")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", help="DiT-forward square sizes (default 1024 1328)")
    parser.add_argument("--pipeline-sizes", type=int, nargs="+", help="pipeline square sizes (default 1024 1328)")
    parser.add_argument("--steps", type=int, default=50, help="pipeline steps")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--text-len", type=int, default=128, help="DiT-forward text tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed DiT forwards per case (median reported)")
    parser.add_argument("--cache-thresholds", type=float, nargs="+", help="step-cache thresholds to run")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference")
    parser.add_argument("--fp8-modulation", action="store_true", help="also time FP8 with FP8 modulation linears")
    parser.add_argument(
        "--pipeline-variants",
        nargs="+",
        choices=PIPELINE_VARIANTS,
        default=list(PIPELINE_VARIANTS),
        help="pipeline rows to run (exact always runs: it is the quality reference)",
    )
    parser.add_argument(
        "--explore",
        action="store_true",
        help="extra rows: attention kernels in the DiT, CUDA graph capture, eager pipeline",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="pipeline: also time text encoding, each step and VAE decoding apart (exact, with and without graph; "
        "first pipeline size)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([64, 96] if args.tiny else [1024, 1328])
    args.pipeline_sizes = args.pipeline_sizes or ([64] if args.tiny else [1024, 1328])
    args.cache_thresholds = args.cache_thresholds or [speed.DEFAULT_CACHE_THRESHOLD]
    if args.tiny:
        args.text_len = min(args.text_len, 16)
    args.out = args.out or RESULTS / ("speed_tiny.json" if args.tiny else "speed.json")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Random full-size modules


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int, *, gate_scale: float = 1.0) -> None:
    """Fill every parameter in place: norms near 1, biases small, matrices ~ N(0, 1/fan_in)."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and ("norm" in name or name.endswith("gamma")):
            p.normal_(1.0, 0.05, generator=gen)
        elif p.dim() == 1:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            fan_in = p[0].numel() if p.dim() < 5 else p[0, :, -1].numel()
            std = fan_in**-0.5
            if "_mod." in name:  # keep shift/scale/gate moderate, so 60 random blocks stay finite in bf16
                std *= gate_scale
            p.normal_(0.0, std, generator=gen)


def build_dit(params: DiTParams, device: torch.device, dtype: torch.dtype) -> QwenImageDiT:
    with torch.device("meta"):
        dit = QwenImageDiT(params)
    dit = dit.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    fill_random_(dit, 0, gate_scale=0.25)
    smooth_time_embedding_(dit)
    return dit


@torch.no_grad()
def smooth_time_embedding_(dit: QwenImageDiT) -> None:
    """Fade out the sinusoid's fast channels in the random timestep MLP, so the embedding varies smoothly with sigma.

    A trained embedding does (neighbouring steps get similar modulation); a uniformly random one turns a sigma step
    of 0.02 into phase jumps of up to 20 rad and unrelated modulation at every step, which no step cache could
    follow. Channel k (of 128, cos and sin alike) has frequency 1000 * 10000^(-k/128) per unit of sigma; channels
    below k ~ 50 move more than ~0.5 rad per step of a 50-step schedule and are faded out.
    """
    weight = dit.time_text_embed.timestep_embedder.linear_1.weight
    half = weight.shape[1] // 2
    k = torch.arange(half, device=weight.device, dtype=torch.float32)
    fade = torch.sigmoid((k - 0.45 * half) / (0.03 * half)).repeat(2).to(weight.dtype)
    weight.mul_(fade)


def build_text_encoder(tiny: bool, device: torch.device, dtype: torch.dtype, folder: Path) -> QwenTextEncoder:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    params = TINY_TEXT_ENCODER if tiny else REAL_TEXT_ENCODER
    tokenizer = load_tokenizer(write_offline_tokenizer(folder))
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(params.text_config())
    model = model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    fill_random_(model, 1)
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)  # non-persistent inv_freq
    return QwenTextEncoder(model, tokenizer)


def build_vae(tiny: bool, device: torch.device, dtype: torch.dtype) -> QwenImageVAE:
    with torch.device("meta"):
        vae = QwenImageVAE(TINY_VAE if tiny else REAL_VAE)
    vae = vae.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    fill_random_(vae, 2)
    return vae


def diffusers_dit(dit: QwenImageDiT) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel.from_config(dit.params.to_config())
    ref.load_state_dict(dit.state_dict(), assign=True, strict=True)
    # Its RoPE tables are plain tensor attributes made at init (meta above): rebuild them for real.
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(dit.params.axes_dims), scale_rope=True)
    return ref.eval().requires_grad_(False)


def diffusers_pipeline(dit_ref: torch.nn.Module, te: QwenTextEncoder, vae: QwenImageVAE) -> Any:
    """diffusers' QwenImagePipeline over the same tensors (its text encoder wraps our language model)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    params = REAL_TEXT_ENCODER if te.model.config.hidden_size == REAL_TEXT_ENCODER.hidden_size else TINY_TEXT_ENCODER
    device, dtype = te.device, te.dtype
    with torch.device("meta"):
        full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**params.to_config()))
    full.model.language_model = te.model
    # The vision tower is never run for text-to-image; it only needs real (uninitialized) storage.
    full.model.visual = full.model.visual.to(dtype=dtype).to_empty(device=device)
    full.lm_head.weight = te.model.embed_tokens.weight
    full = full.eval().requires_grad_(False)
    with torch.device("meta"):
        vae_ref = AutoencoderKLQwenImage.from_config(vae.params.to_config())
    vae_ref.load_state_dict(vae.state_dict(), assign=True, strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae_ref.eval().requires_grad_(False),
        text_encoder=full,
        tokenizer=te.tokenizer,
        transformer=dit_ref,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median / min milliseconds of `fn` over `repeats` runs after `warmup` runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return {"ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "runs": len(times)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def psnr(a: Any, b: Any) -> float:
    mse = float(((torch.as_tensor(a).float() - torch.as_tensor(b).float()) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def dit_flops(n_img: int, n_txt: int, width: int, layers: int) -> float:
    """REFERENCE.md's count: 24·D²·S·layers + 4·S²·D·layers."""
    s = n_img + n_txt
    return 24 * width**2 * s * layers + 4 * s**2 * width * layers


class Recorder:
    """Collects result rows, prints each as it comes, and calls `on_row` (which may save what was measured so far)."""

    def __init__(self, on_row: Callable[[], None] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.on_row = on_row

    def add(self, impl: str, case: dict[str, Any], **values: Any) -> dict[str, Any]:
        row = {"impl": impl, "case": case, **values}
        self.rows.append(row)
        shown = {k: v for k, v in values.items() if not isinstance(v, (list, dict))}
        print(f"[row] {impl:9s} {json.dumps(case)} {json.dumps(shown)}", flush=True)
        if self.on_row is not None:
            self.on_row()
        return row


# ----------------------------------------------------------------------------------------------------------------------
# Sections


@torch.no_grad()  # inference: with autograd on, key padding would take the masked (trainable) kernels instead
def section_attention(args: argparse.Namespace, rec: Recorder, device: torch.device, params: DiTParams) -> None:
    from imagezoo.plugins.qwen_image import attention

    heads, dim = params.num_heads, params.head_dim
    gen = torch.Generator(device=device).manual_seed(3)
    for size in args.sizes:
        n_img = (size // 16) ** 2
        n_txt = args.text_len
        for batch, padded in ((1, False), (2, True)):

            def rnd(n: int, batch: int = batch) -> torch.Tensor:
                return torch.randn(batch, n, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)

            q, k_txt, k_img, v_txt, v_img = rnd(n_txt + n_img), rnd(n_txt), rnd(n_img), rnd(n_txt), rnd(n_img)
            mask = None
            if padded:
                valid = torch.ones(batch, n_txt, dtype=torch.bool, device=device)
                valid[1, 6:] = False  # a CFG batch: the negative prompt " " is 6 tokens
                mask = torch.cat([valid, valid.new_ones(batch, n_img)], 1)[:, None, None, :]
            # Reference in float32 math on upcast inputs.
            k, v = torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1)
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(
                    q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), attn_mask=mask
                ).transpose(1, 2)
            s = n_txt + n_img
            flops = 4 * batch * heads * dim * s * s
            for backend in ("sdpa", "cudnn", "flash", "efficient", "varlen", "auto"):
                case = {"op": "attention", "size": size, "batch": batch, "padded": padded, "backend": backend}
                run = functools.partial(attention.joint_attention, q, k_txt, k_img, v_txt, v_img, mask, backend)
                try:
                    out = run()
                    timing = time_ms(run, device, 10, warmup=2)
                except RuntimeError as exc:
                    rec.add("imagezoo", case, error=str(exc).splitlines()[0][:200])
                    continue
                resolved = attention.resolve_backend(backend, device, attention.mask_kind(mask), q.dtype)
                err = rel_err(out, ref)
                tflops = flops / (timing["ms"] * 1e-3) / 1e12
                rec.add("imagezoo", case, resolved=resolved, rel_err=round(err, 6), tflops=round(tflops, 1), **timing)
    _key_length_sweep(rec, device, params, (args.sizes[0] // 16) ** 2)


def _key_length_sweep(rec: Recorder, device: torch.device, params: DiTParams, n_img: int) -> None:
    """cuDNN attention at joint lengths of 1024² prompts: 6 text tokens (the CFG negative " "), 96, 128; and 0."""
    heads, dim = params.num_heads, params.head_dim
    gen = torch.Generator(device=device).manual_seed(8)
    for n_txt in (0, 6, 96, 128):
        n = n_img + n_txt
        q, k, v = (
            torch.randn(1, n, heads, dim, device=device, dtype=torch.bfloat16, generator=gen).transpose(1, 2)
            for _ in range(3)
        )

        def run(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

        timing = time_ms(run, device, 20, warmup=3)
        tflops = 4 * heads * dim * n * n / (timing["ms"] * 1e-3) / 1e12
        case = {"op": "attention_length", "tokens": n, "text": n_txt, "backend": "cudnn"}
        rec.add("imagezoo", case, tflops=round(tflops, 1), **timing)


def section_gemm(args: argparse.Namespace, rec: Recorder, device: torch.device, params: DiTParams) -> None:
    width = params.width
    m = (max(args.sizes) // 16) ** 2
    mode = speed._probe_fp8_mode(device.type, device.index, torch.bfloat16)
    rec.add("imagezoo", {"op": "fp8_probe"}, mode=mode)
    gen = torch.Generator(device=device).manual_seed(4)
    for k, n in ((width, width), (width, 4 * width), (4 * width, width)):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * k**-0.5
        b = torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
        wq, ws = speed.quantize_fp8_rowwise(w)
        xq, xs = speed.quantize_fp8_rowwise(x)
        ref = F.linear(x.float(), w.float(), b.float())
        flops = 2 * m * n * k
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "bf16": lambda x=x, w=w, b=b: F.linear(x, w, b),
            "fp8_prequantized": lambda xq=xq, xs=xs, wq=wq, ws=ws, b=b: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1), bias=b, out_dtype=torch.bfloat16
            ),
            "fp8_linear": lambda x=x, wq=wq, ws=ws, b=b: speed.fp8_linear(
                x, wq, ws.reshape(1, -1), b, mode, torch.bfloat16
            ),
        }
        if n == 4 * width:  # the MLP up-projection: GELU after the GEMM, or in its epilogue
            ref_gelu = F.gelu(ref, approximate="tanh")
            runs["bf16_gelu"] = lambda x=x, w=w, b=b: F.gelu(F.linear(x, w, b), approximate="tanh")
            runs["fused_gelu"] = lambda x=x, w=w, b=b: fused.linear_gelu_tanh(x, w, b)
        for name, fn in runs.items():
            case = {"op": "linear", "m": m, "k": k, "n": n, "kind": name}
            try:
                out = fn()
                timing = time_ms(fn, device, 20, warmup=3)
            except RuntimeError as exc:
                rec.add("imagezoo", case, error=str(exc).splitlines()[0][:200])
                continue
            tflops = flops / (timing["ms"] * 1e-3) / 1e12
            target = ref_gelu if name.endswith("gelu") else ref
            rec.add("imagezoo", case, rel_err=round(rel_err(out, target), 5), tflops=round(tflops, 1), **timing)


def _block_gemms(
    img: torch.Tensor, txt: torch.Tensor, weights: dict[str, torch.Tensor], fused_qkv: bool, side: Any
) -> None:
    """One block's GEMMs, image stream then text stream per phase; text on `side` (a CUDA stream) when given."""

    def qkv(x: torch.Tensor, prefix: str) -> None:
        if fused_qkv:
            F.linear(x, weights[prefix + "qkv"], weights[prefix + "qkv_b"])
        else:
            for name in "qkv":
                F.linear(x, weights[prefix + name], weights[prefix + "b"])

    def rest(x: torch.Tensor, prefix: str) -> None:
        F.linear(x, weights[prefix + "q"], weights[prefix + "b"])  # output projection
        hidden = fused.linear_gelu_tanh(x, weights[prefix + "up"], weights[prefix + "up_b"])
        F.linear(hidden, weights[prefix + "down"], weights[prefix + "b"])

    main = torch.cuda.current_stream()
    for phase in (qkv, rest):
        if side is None:
            phase(img, "img_")
            phase(txt, "txt_")
            continue
        side.wait_stream(main)
        with torch.cuda.stream(side):
            phase(txt, "txt_")
        phase(img, "img_")
        main.wait_stream(side)


def section_overlap(args: argparse.Namespace, rec: Recorder, device: torch.device, params: DiTParams) -> None:
    """Can the text stream's GEMMs (few rows: bound by weight reads) hide under the image stream's (compute bound)?

    Times one block's twelve linears, 20 blocks per CUDA graph replay (no launch gaps), arranged: in sequence as the
    block runs them; with each stream's q/k/v as one GEMM; with the text stream's on a second CUDA stream.
    """
    width = params.width
    gen = torch.Generator(device=device).manual_seed(6)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen) * scale

    weights: dict[str, torch.Tensor] = {}
    for prefix in ("img_", "txt_"):
        for name in "qkv":
            weights[prefix + name] = rnd(width, width, scale=width**-0.5)
        weights[prefix + "qkv"] = torch.cat([weights[prefix + name] for name in "qkv"])
        weights[prefix + "b"] = rnd(width, scale=0.02)
        weights[prefix + "qkv_b"] = rnd(3 * width, scale=0.02)
        weights[prefix + "up"] = rnd(4 * width, width, scale=width**-0.5)
        weights[prefix + "up_b"] = rnd(4 * width, scale=0.02)
        weights[prefix + "down"] = rnd(width, 4 * width, scale=(4 * width) ** -0.5)
    blocks = 20
    for size in args.sizes:
        for batch, n_txt in ((1, args.text_len), (2, 2 * 91)):  # 91: the pipeline prompt's tokens, twice for CFG
            img = rnd(batch * (size // 16) ** 2, width)
            txt = rnd(n_txt, width)
            for label, fused_qkv, two_streams in (
                ("sequence", False, False),
                ("fused_qkv", True, False),
                ("two_streams", False, True),
                ("two_streams+fused_qkv", True, True),
                ("image_only", False, None),
            ):
                case = {"op": "block_gemms", "size": size, "batch": batch, "text_rows": n_txt, "variant": label}
                side = torch.cuda.Stream(device) if two_streams else None
                text = txt if two_streams is not None else txt[:0]
                try:
                    for _ in range(2):  # warm-up outside the graph (cuBLAS workspaces, heuristics)
                        _block_gemms(img, text, weights, fused_qkv, side)
                    sync(device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(blocks):
                            _block_gemms(img, text, weights, fused_qkv, side)
                    timing = time_ms(graph.replay, device, 10, warmup=2)
                except RuntimeError as exc:
                    rec.add("imagezoo", case, error=str(exc).splitlines()[0][:200])
                    continue
                rec.add("imagezoo", case, block_ms=round(timing["ms"] / blocks, 4), **timing)
                del graph


DIT_SIGMA = 0.7


def dit_inputs(size: int, batch: int, n_txt: int, device: torch.device, params: DiTParams, seed: int = 5):
    gen = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(batch, 16, size // 8, size // 8, device=device, dtype=torch.bfloat16, generator=gen)
    sigma = torch.full((batch,), DIT_SIGMA, device=device, dtype=torch.bfloat16)
    text = torch.randn(batch, n_txt, params.text_dim, device=device, dtype=torch.bfloat16, generator=gen)
    mask = None
    if batch > 1:  # a CFG batch: prompt, then the 6-token negative prompt padded to its length
        mask = torch.ones(batch, n_txt, dtype=torch.bool, device=device)
        mask[1:, 6:] = False
    return latents, sigma, text, mask


def run_ours(dit: QwenImageDiT, inputs: tuple) -> torch.Tensor:
    latents, sigma, text, mask = inputs
    return dit(latents, sigma, text, mask)


def run_theirs(ref: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    latents, sigma, text, mask = inputs
    b, _, h, w = latents.shape
    out = ref(
        hidden_states=pack_latents(latents),
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=sigma,
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def dit_cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    cases = [(size, 1) for size in args.sizes]
    return [*cases, (args.sizes[0], 2)]


def section_dit(
    args: argparse.Namespace, rec: Recorder, device: torch.device, dit: QwenImageDiT, ref: torch.nn.Module | None
) -> dict[tuple[int, int], torch.Tensor]:
    """Time every implementation per case; returns imagezoo-exact outputs (for the FP8 error rows later)."""
    params = dit.params
    outputs: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def measure(impl: str, label: str, fn: Callable[[tuple], torch.Tensor], batch2_only: bool = False) -> None:
        outputs[label] = {}
        for size, batch in dit_cases(args):
            if batch2_only and batch == 1:
                continue
            inputs = dit_inputs(size, batch, args.text_len, device, params)
            case = {"op": "dit_forward", "size": size, "batch": batch, "text": args.text_len, "variant": label}
            try:
                t0 = time.perf_counter()
                out = fn(inputs)
                sync(device)
                first_s = time.perf_counter() - t0
                timing = time_ms(lambda inputs=inputs: fn(inputs), device, args.repeats)
            except Exception as exc:  # one failing variant must not cost the other rows of a GPU run
                logger.exception("dit forward %s failed", label)
                rec.add(impl, case, error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            outputs[label][(size, batch)] = out
            flops = batch * dit_flops((size // 16) ** 2, args.text_len, params.width, params.num_layers)
            values = {**timing, "tflops": round(flops / (timing["ms"] * 1e-3) / 1e12, 1), "first_call_s": first_s}
            if "diffusers" in outputs and label != "diffusers":
                values["rel_err_vs_diffusers"] = round(rel_err(out, outputs["diffusers"][(size, batch)]), 5)
            if "exact" in outputs and label.startswith("fp8"):
                values["rel_err_vs_exact"] = round(rel_err(out, outputs["exact"][(size, batch)]), 5)
            rec.add(impl, case, **values)

    with torch.no_grad():
        if ref is not None:
            measure("diffusers", "diffusers", lambda inputs: run_theirs(ref, inputs))
        dit.disable_speed()
        dit.set_attention_backend("sdpa")
        measure("imagezoo", "eager-sdpa", lambda inputs: run_ours(dit, inputs))
        if args.explore:  # the padded CFG batch with each kernel that takes key padding
            for backend in ("cudnn", "efficient", "varlen"):
                dit.set_attention_backend(backend)
                measure("imagezoo", f"eager-{backend}", lambda inputs: run_ours(dit, inputs), batch2_only=True)
        dit.set_attention_backend("auto")
        measure("imagezoo", "eager-auto", lambda inputs: run_ours(dit, inputs))
        state = dit.enable_speed("exact")
        measure("imagezoo", "exact", lambda inputs: run_ours(dit, inputs))
        rec.add("imagezoo", {"op": "compile_count", "variant": "exact"}, compiles=state.counter.compiles)
        # The same forward as a sampling loop runs it from its third step: modulation from the loop's tables, the
        # rest replayed from a CUDA graph captured at the second step (`QwenImageDiT.sampling`).
        with dit.sampling([DIT_SIGMA]):
            measure("imagezoo", "exact-loop", lambda inputs: run_ours(dit, inputs))
        if args.explore:
            for label, options in EXPLORE_VARIANTS.items():
                if label in LOOP_ONLY:
                    continue
                apply_variant(dit, options)
                measure("imagezoo", label, lambda inputs: run_ours(dit, inputs), batch2_only="share" in options)
            apply_variant(dit, {})
    return outputs["exact"]


# Exact settings other than the profile's, timed side by side with `--explore`: DiT attributes and speed options.
EXPLORE_VARIANTS: dict[str, dict[str, Any]] = {
    "exact-apart": {"share": False},
    "exact-gelu": {"fused_gelu": False},
    "exact-qk": {"fused_qk": False},
    "exact-norm": {"fused_norm": False},
    "exact-graph": {"cuda_graph": False},
    "exact-tables": {"tables": False},
}
# Settings that act only inside a sampling loop: the plain DiT-forward rows would repeat `exact`.
LOOP_ONLY = ("exact-graph", "exact-tables")


def apply_variant(dit: QwenImageDiT, options: dict[str, Any]) -> None:
    """The `exact` profile with one of `EXPLORE_VARIANTS` on top."""
    options = dict(options)
    dit.share_padded_linears = options.pop("share", True)
    dit.modulation_tables = options.pop("tables", True)
    dit.enable_speed("exact", **options)


def section_fp8_dit(
    args: argparse.Namespace,
    rec: Recorder,
    device: torch.device,
    dit: QwenImageDiT,
    exact: dict[tuple[int, int], torch.Tensor],
    keep_bf16: bool,
) -> None:
    params = dit.params
    with torch.no_grad():
        for modulation in (False, True) if args.fp8_modulation and keep_bf16 else (False,):
            label = "fp8" + ("+mod" if modulation else "")
            t0 = time.perf_counter()
            state = dit._speed_state
            if state is not None and state.config.fp8 and state.config.fp8_modulation == modulation:
                dit.step_cache = None  # reuse the pipeline's FP8 weights (no bf16 left to requantize from)
            else:
                state = dit.enable_speed("fp8", fp8_modulation=modulation, fp8_keep_bf16=keep_bf16)
            setup_s = time.perf_counter() - t0
            for size, batch in dit_cases(args):
                inputs = dit_inputs(size, batch, args.text_len, device, params)
                case = {"op": "dit_forward", "size": size, "batch": batch, "text": args.text_len, "variant": label}
                t0 = time.perf_counter()
                out = run_ours(dit, inputs)
                sync(device)
                first_s = time.perf_counter() - t0
                timing = time_ms(lambda inputs=inputs: run_ours(dit, inputs), device, args.repeats)
                flops = batch * dit_flops((size // 16) ** 2, args.text_len, params.width, params.num_layers)
                values = {**timing, "tflops": round(flops / (timing["ms"] * 1e-3) / 1e12, 1), "first_call_s": first_s}
                if (size, batch) in exact:
                    values["rel_err_vs_exact"] = round(rel_err(out, exact[(size, batch)]), 5)
                rec.add("imagezoo", case, fp8_mode=state.fp8_mode, setup_s=round(setup_s, 2), **values)
                with dit.sampling([DIT_SIGMA]):  # as a sampling loop runs it (see section_dit's "exact-loop")
                    run_ours(dit, inputs)
                    loop = time_ms(lambda inputs=inputs: run_ours(dit, inputs), device, args.repeats)
                rec.add("imagezoo", {**case, "variant": f"{label}-loop"}, fp8_mode=state.fp8_mode, **loop)
            rec.add("imagezoo", {"op": "compile_count", "variant": label}, compiles=state.counter.compiles)
            if keep_bf16:
                dit.disable_speed()


def section_recompile(args: argparse.Namespace, rec: Recorder, device: torch.device, dit: QwenImageDiT) -> None:
    params = dit.params
    sizes = [(64, 64), (96, 64), (80, 112)] if args.tiny else [(1024, 1024), (1328, 1328), (928, 1664)]
    lengths = [8, 16, 24] if args.tiny else [64, 128, 200]
    with torch.no_grad():
        state = dit._speed_state if dit._speed_state is not None and dit._speed_state.counter else None
        if state is None or state.config.fp8:
            state = dit.enable_speed("exact")
        # Warm-up: the variants a pipeline uses (batch 1 unmasked; CFG batch with padding), plain and as a sampling
        # loop runs them (modulation from the loop's tables).
        for batch in (1, 2):
            inputs = dit_inputs(args.sizes[0], batch, args.text_len, device, params)
            run_ours(dit, inputs)
            with dit.sampling([DIT_SIGMA, SWEEP_SIGMA]):
                run_ours(dit, inputs)
        warm = state.counter.compiles
        n_cfg = len(sizes)  # the sweep runs one CFG batch per size
        for mode in ("plain", "loop"):
            with dit.sampling([SWEEP_SIGMA]) if mode == "loop" else contextlib.nullcontext():
                times = _recompile_sweep(dit, device, sizes, lengths)
            rec.add(
                "imagezoo",
                {"op": "recompile_check", "mode": mode, "sizes": sizes, "text_lengths": lengths, "cfg_batches": n_cfg},
                compiles_after_warmup=warm,
                compiles_after_sweep=state.counter.compiles,
                recompiles=state.counter.compiles - warm,
                sweep_ms=times,
            )


SWEEP_SIGMA = 0.5


def _recompile_sweep(
    dit: QwenImageDiT, device: torch.device, sizes: list[tuple[int, int]], lengths: list[int]
) -> list[float]:
    """One forward per size and text length, plus a CFG batch per size; milliseconds of each batch-1 forward."""
    params = dit.params
    times = []
    for height, width in sizes:
        for length in lengths:
            gen = torch.Generator(device=device).manual_seed(height + length)
            latents = torch.randn(1, 16, height // 8, width // 8, device=device, dtype=torch.bfloat16, generator=gen)
            text = torch.randn(1, length, params.text_dim, device=device, dtype=torch.bfloat16, generator=gen)
            t0 = time.perf_counter()
            dit(latents, torch.full((1,), SWEEP_SIGMA, device=device), text)
            sync(device)
            times.append(round((time.perf_counter() - t0) * 1000, 1))
        # A CFG batch at this size: prompt of the last length, negative prompt of another length each time.
        mask = torch.ones(2, length, dtype=torch.bool, device=device)
        mask[1, 4 + len(times) :] = False
        sigma = torch.full((2,), SWEEP_SIGMA, device=device)
        dit(latents.expand(2, -1, -1, -1), sigma, text.expand(2, -1, -1), mask)
    return times


def kernel_profile(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Wall time of one `fn()`, GPU-busy share (union of kernel intervals) and kernel time by kind (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e6
    return kernel_stats(prof.events(), wall)


def kernel_stats(events: Any, wall_us: float) -> dict[str, Any]:
    """Kernel time by kind, the top kernels and the GPU-busy share of `wall_us`, from profiler events."""
    groups = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels: dict[str, float] = {}
    spans = []
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        spans.append((event.time_range.start, event.time_range.end))
        us = event.time_range.elapsed_us()
        low = name.lower()
        if any(t in low for t in ("flash", "fmha", "sdpa", "attention", "attn")) and "triton" not in low:
            group = "attention"
        elif any(t in low for t in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "scaled_mm", "matmul")):
            group = "gemm"
        else:
            group = "other"
        groups[group] += us
        kernels[name[:90]] = kernels.get(name[:90], 0.0) + us
    busy = 0.0  # overlapping kernels count once
    end = -math.inf
    for start, stop in sorted(spans):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms": round(wall_us / 1000, 2),
        "kernel_ms": round(sum(groups.values()) / 1000, 2),
        "kernels": len(spans),
        "busy_share": round(busy / wall_us, 3),
        "group_ms": {k: round(v / 1000, 2) for k, v in groups.items()},
        "top_kernels": [(k, round(v / 1000, 2)) for k, v in top],
    }


def section_profile(args: argparse.Namespace, rec: Recorder, device: torch.device, dit: QwenImageDiT) -> None:
    """GPU-busy share of one forward and where the kernel time goes (eager and compiled)."""
    if device.type != "cuda":
        return
    size = args.sizes[0]
    inputs = dit_inputs(size, 1, args.text_len, device, dit.params)
    with torch.no_grad():
        labels = ["eager-auto", "exact", *(["exact-qk"] if args.explore else [])]
        for label in labels:
            dit.disable_speed()
            if label in EXPLORE_VARIANTS:
                apply_variant(dit, EXPLORE_VARIANTS[label])
            elif label == "exact":
                dit.enable_speed("exact")
            run_ours(dit, inputs)
            sync(device)
            rec.add(
                "imagezoo",
                {"op": "profile", "size": size, "batch": 1, "variant": label},
                **kernel_profile(lambda: run_ours(dit, inputs), device),
            )
        # As a sampling loop runs them from the third step (exact: modulation tables and graph replay; fp8: the
        # graph), batch 1 and CFG.
        for profile, batches in (("exact", (1, 2)), ("fp8", (1,))):
            dit.disable_speed()
            dit.enable_speed(profile)
            for batch in batches:
                batch_inputs = dit_inputs(size, batch, args.text_len, device, dit.params)
                with dit.sampling([DIT_SIGMA]):
                    for _ in range(2):
                        run_ours(dit, batch_inputs)
                    sync(device)
                    profiled = kernel_profile(lambda batch_inputs=batch_inputs: run_ours(dit, batch_inputs), device)
                case = {"op": "profile", "size": size, "batch": batch, "variant": f"{profile}-loop"}
                rec.add("imagezoo", case, **profiled)
        dit.disable_speed()  # frees the FP8 copies
        if args.explore:
            section_cuda_graph(rec, device, dit, inputs)


def section_cuda_graph(rec: Recorder, device: torch.device, dit: QwenImageDiT, inputs: tuple) -> None:
    """Replay a captured forward against a normal one (same static inputs): eager and compiled, batch 1 and CFG."""
    size = inputs[0].shape[-1] * 8
    cfg_inputs = dit_inputs(size, 2, inputs[2].shape[1], device, dit.params)
    for label, batch_inputs in (("eager-auto", inputs), ("exact", inputs), ("exact", cfg_inputs)):
        dit.disable_speed()
        if label == "exact":
            dit.enable_speed("exact")
        case = {"op": "cuda_graph", "size": size, "batch": batch_inputs[0].shape[0], "variant": label}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run_ours(dit, batch_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run_ours(dit, batch_inputs)
            replay = time_ms(graph.replay, device, 5)
            plain = time_ms(lambda batch_inputs=batch_inputs: run_ours(dit, batch_inputs), device, 5)
            err = rel_err(out, run_ours(dit, batch_inputs))
            rec.add("imagezoo", case, graph_ms=replay["ms"], plain_ms=plain["ms"], rel_err=round(err, 6))
            del graph
        except Exception as exc:  # an exploratory row: record why capture failed, and go on
            rec.add("imagezoo", case, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def our_pipeline(dit: QwenImageDiT, te: QwenTextEncoder, vae: QwenImageVAE, device: torch.device) -> Any:
    from imagezoo.pipeline import Pipeline
    from imagezoo.plugin_manager import get_kernel

    entry = get_kernel().models.get("Qwen/Qwen-Image")
    components = Components(
        text_encoder=te, denoiser=QwenDenoiser(dit), vae=vae, modules={"dit": dit, "text_encoder": te.model, "vae": vae}
    )
    return Pipeline(components, defaults=entry.defaults, device=device, dtype=torch.bfloat16, entry=entry)


def _profile_steps(
    generate: Callable[..., Any], dit: QwenImageDiT, device: torch.device, first: int, count: int
) -> dict[str, Any]:
    """Kernel statistics of steps `first` .. `first + count - 1` of one generation, per step (top kernels: summed),
    and the CUDA graph captures and replays of the loop by then."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    window: list[float] = []
    graphs: dict[str, int] = {}

    def on_step(index: int, sigma: float, latents: torch.Tensor) -> None:
        if index == first - 1:
            sync(device)
            prof.start()
            window.append(time.perf_counter())
        elif index == first + count - 1:
            sync(device)
            window.append(time.perf_counter())
            prof.stop()
            scope = dit._sampling
            if scope is not None and scope.graphs is not None:
                graphs.update(captures=scope.graphs.captures, replays=scope.graphs.replays)
                graphs["record_ms"] = round(scope.graphs.record_s * 1000, 1)

    generate(on_step)
    stats = kernel_stats(prof.events(), (window[1] - window[0]) * 1e6)
    per_step = {k: v for k, v in stats.items() if k in ("busy_share", "top_kernels")}
    per_step.update({k: round(stats[k] / count, 2) for k in ("wall_ms", "kernel_ms", "kernels")})
    per_step["group_ms"] = {k: round(v / count, 2) for k, v in stats["group_ms"].items()}
    return {**per_step, **graphs}


def pipeline_stages(pipe: Any, generate: Callable[..., Any], device: torch.device) -> dict[str, Any]:
    """Wall seconds of one generation's text encoding, each step and VAE decoding (synchronized at each boundary),
    and on CUDA a kernel profile of its steady steps (3 to 5, from a further generation).

    `generate(on_step)` runs one generation, calling `on_step(index, sigma, latents)` after each step.
    """
    marks: dict[str, list[float]] = {"encode": [], "decode": [], "steps": []}
    last = [0.0]

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            marks[key].append(time.perf_counter() - t0)
            return out

        return run

    sampling = pipe.denoiser.sampling

    @contextlib.contextmanager
    def sampling_from_now(sigmas: Any) -> Any:
        with sampling(sigmas):
            sync(device)
            last[0] = time.perf_counter()
            yield

    def step_done(index: int, sigma: float, latents: torch.Tensor) -> None:
        sync(device)
        now = time.perf_counter()
        marks["steps"].append(now - last[0])
        last[0] = now

    pipe.text_encoder.encode = timed(pipe.text_encoder.encode, "encode")
    pipe.vae.decode = timed(pipe.vae.decode, "decode")
    pipe.denoiser.sampling = sampling_from_now
    try:
        with torch.inference_mode():
            generate(step_done)  # warm-up
            for values in marks.values():
                values.clear()
            sync(device)
            t0 = time.perf_counter()
            generate(step_done)
            sync(device)
            total = time.perf_counter() - t0
        profiled = _profile_steps(generate, pipe.denoiser.dit, device, 3, 3) if device.type == "cuda" else None
    finally:  # the instance attributes shadowed the methods
        del pipe.text_encoder.encode, pipe.vae.decode, pipe.denoiser.sampling
    steps = marks["steps"]
    return {
        "steady_steps_profile": profiled,
        "s": round(total, 3),
        "encode_s": round(sum(marks["encode"]), 4),
        "decode_s": round(sum(marks["decode"]), 4),
        "steps_s": round(sum(steps), 3),
        "first_steps_ms": [round(t * 1000, 1) for t in steps[:3]],
        "median_step_ms": round(statistics.median(steps[3:]) * 1000, 2) if len(steps) > 3 else None,
    }


def section_pipeline(
    args: argparse.Namespace,
    rec: Recorder,
    device: torch.device,
    dit: QwenImageDiT,
    te: QwenTextEncoder,
    vae: QwenImageVAE,
    holder: dict[str, Any],
) -> None:
    """`holder["ref"]`: diffusers' DiT (or None); popped here so the bf16 weights can go before the FP8 rows."""
    ref_dit = holder.pop("ref", None)
    pipe = our_pipeline(dit, te, vae, device)
    tokens = len(te.tokenizer(PROMPT)["input_ids"])
    ref_pipe = diffusers_pipeline(ref_dit, te, vae) if ref_dit is not None else None
    if ref_pipe is not None:
        ref_pipe.set_progress_bar_config(disable=True)
    exact: dict[int, tuple[torch.Tensor, Any]] = {}

    def noise_for(size: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(42)
        return torch.randn(1, 16, size // 8, size // 8, generator=gen)

    def ours(size: int, steps: int, on_step: Callable[..., None] | None = None) -> tuple[torch.Tensor, Any]:
        final: list[torch.Tensor] = []

        def keep_last(index: int, sigma: float, latents: torch.Tensor) -> None:
            if on_step is not None:
                on_step(index, sigma, latents)
            if index == steps - 1:
                final.append(latents.clone())

        images = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            cfg_scale=args.cfg,
            height=size,
            width=size,
            num_inference_steps=steps,
            latents=noise_for(size),
            output_type="np",
            progress_bar_cmd=lambda x: x,
            step_callback=keep_last,
        )
        return final[0], images

    def theirs(size: int, steps: int) -> tuple[torch.Tensor, Any]:
        final: list[torch.Tensor] = []

        def keep_last(p: Any, index: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if index == steps - 1:
                final.append(unpack_latents(kwargs["latents"].float(), size // 8, size // 8))
            return kwargs

        out = ref_pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            true_cfg_scale=args.cfg,
            height=size,
            width=size,
            num_inference_steps=steps,
            latents=pack_latents(noise_for(size)).to(device, torch.bfloat16),
            output_type="np",
            callback_on_step_end=keep_last,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        return final[0], out.images

    def run(impl: str, label: str, size: int, fn: Callable[[int, int], tuple[torch.Tensor, Any]], **extra: Any):
        case = {"op": "pipeline", "size": size, "steps": args.steps, "cfg": args.cfg, "variant": label}
        try:
            with torch.inference_mode():
                fn(size, 2)  # warm-up: compiles, kernel choices, allocator
                sync(device)
                cache = dit.step_cache
                if cache is not None:
                    cache.reset()
                t0 = time.perf_counter()
                latents, images = fn(size, args.steps)
                sync(device)
                seconds = time.perf_counter() - t0
        except Exception as exc:  # one failing variant must not cost the other rows of a GPU run
            logger.exception("pipeline %s failed", label)
            rec.add(impl, case, error=f"{type(exc).__name__}: {exc}"[:300])
            return None
        values: dict[str, Any] = {"s": round(seconds, 3), "prompt_tokens": tokens, **extra}
        if cache is not None and hasattr(cache, "stats"):
            values["skipped_steps"] = cache.stats()["skipped"]
            values["change_history"] = [round(c, 4) for c in cache.history]
        if size in exact and label != "exact":
            values["latent_rel_err_vs_exact"] = round(rel_err(latents, exact[size][0]), 5)
            values["psnr_vs_exact_db"] = psnr(images, exact[size][1])
        if not torch.isfinite(latents).all():
            values["non_finite"] = True
        if device.type == "cuda":
            values["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 1)
        rec.add(impl, case, **values)
        return latents, images

    for size in args.pipeline_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dit.disable_speed()
        dit.enable_speed("exact")
        result = run("imagezoo", "exact", size, ours)
        if result is not None:
            exact[size] = result
        if args.explore and device.type == "cuda":  # what the GPU does between DiT forwards, over a few steps
            with torch.inference_mode():
                profiled = kernel_profile(functools.partial(ours, size, 4), device)
            rec.add("imagezoo", {"op": "profile", "size": size, "pipeline_steps": 4, "variant": "exact"}, **profiled)
        if args.stages and size == args.pipeline_sizes[0]:
            for label, options in (("exact", {}), ("exact-graph", EXPLORE_VARIANTS["exact-graph"])):
                apply_variant(dit, options)
                rec.add(
                    "imagezoo",
                    {"op": "pipeline_stages", "size": size, "steps": args.steps, "variant": label},
                    **pipeline_stages(pipe, functools.partial(ours, size, args.steps), device),
                )
            apply_variant(dit, {})
        if size == args.pipeline_sizes[0] and not args.explore:  # what the graph, fused norms and host sigmas add
            for label in ("exact-graph", "exact-norm"):
                apply_variant(dit, EXPLORE_VARIANTS[label])
                run("imagezoo", label, size, ours)
            apply_variant(dit, {})
            # Each step's sigma made on the GPU: the DiT then reads it back to find its modulation row, and waits.
            pipe._sigma_tensor = lambda n, sigma, where: torch.full((n,), sigma, device=where, dtype=pipe.dtype)
            run("imagezoo", "exact-gpu-sigma", size, ours)
            del pipe._sigma_tensor
        if ref_pipe is not None and "diffusers" in args.pipeline_variants:
            run("diffusers", "diffusers", size, theirs)
        for threshold in args.cache_thresholds if "cache" in args.pipeline_variants else ():
            dit.enable_speed("cache", step_cache=threshold)
            run("imagezoo", f"cache@{threshold:g}", size, ours, threshold=threshold)
        if args.explore:
            for label, options in EXPLORE_VARIANTS.items():
                apply_variant(dit, options)
                run("imagezoo", label, size, ours)
            apply_variant(dit, {})
            dit.enable_speed("off")
            run("imagezoo", "eager-auto", size, ours)
    # FP8 last: without the diffusers reference holding the bf16 tensors, they are freed (fp8_keep_bf16=False).
    ref_pipe = ref_dit = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not {"fp8", "fastest"} & set(args.pipeline_variants):
        return
    dit.enable_speed("fp8", fp8_keep_bf16=False)
    for size in args.pipeline_sizes:
        dit.step_cache = None
        if "fp8" in args.pipeline_variants:
            run("imagezoo", "fp8", size, ours)
            if size == args.pipeline_sizes[0]:  # FP8 without the CUDA graph; with the fused norms; with the tables
                dit.cuda_graph = False
                run("imagezoo", "fp8-graph", size, ours)
                dit.cuda_graph = True
                speed.set_fused_ops(dit, gelu=True, qk=True, norm=True)
                run("imagezoo", "fp8+norm", size, ours)
                speed.set_fused_ops(dit, gelu=True, qk=True, norm=False)
                dit.modulation_tables = True
                run("imagezoo", "fp8+tables", size, ours)
                dit.modulation_tables = False
        for threshold in args.cache_thresholds if "fastest" in args.pipeline_variants else ():
            speed.enable_step_cache(dit, threshold, max_skips=speed.SpeedConfig().cache_max_skips)
            run("imagezoo", f"fastest@{threshold:g}", size, ours, threshold=threshold)
    dit.step_cache = None


# ----------------------------------------------------------------------------------------------------------------------
# Main


def guarded(rec: Recorder, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a side section; a failure becomes an error row instead of ending the run."""
    try:
        return fn(*args)
    except Exception as exc:  # a side section failing must not cost the main rows of a GPU run
        logger.exception("section %s failed", name)
        rec.add("imagezoo", {"op": "section_failed", "section": name}, error=f"{type(exc).__name__}: {exc}"[:300])
        return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    params = TINY_DIT if args.tiny else REAL_DIT
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "name": "speed",
        "gpu": gpu,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "versions": versions("imagezoo", "diffusers", "transformers", "triton"),
        "command": rerun_command("benchmarks/speed.py", argv if argv is not None else sys.argv[1:]),
        "total_s": None,  # None until the run ends: a run stopped midway keeps the rows it measured
        "rows": [],
    }
    rec = Recorder(lambda: write_json(args.out, result))
    result["rows"] = rec.rows
    use_diffusers = not args.no_diffusers and importlib.util.find_spec("diffusers") is not None

    if "attention" in args.sections and device.type == "cuda":
        guarded(rec, "attention", section_attention, args, rec, device, params)
    if "gemm" in args.sections and device.type == "cuda":
        guarded(rec, "gemm", section_gemm, args, rec, device, params)
    if "overlap" in args.sections and device.type == "cuda":
        guarded(rec, "overlap", section_overlap, args, rec, device, params)

    t0 = time.perf_counter()
    dit = build_dit(params, device, torch.bfloat16)
    sync(device)
    rec.add("imagezoo", {"op": "build", "what": "dit"}, s=round(time.perf_counter() - t0, 1))
    ref = diffusers_dit(dit) if use_diffusers else None

    exact: dict[tuple[int, int], torch.Tensor] = {}
    if "dit" in args.sections:
        exact = section_dit(args, rec, device, dit, ref)
    if "recompile" in args.sections:
        guarded(rec, "recompile", section_recompile, args, rec, device, dit)
    if "profile" in args.sections:
        guarded(rec, "profile", section_profile, args, rec, device, dit)
    pipeline = "pipeline" in args.sections
    if "dit" in args.sections and not pipeline:
        # Without a pipeline to run afterwards the bf16 copies can stay (and be restored); with one, they must go
        # to leave room for the text encoder, so FP8 then runs after the exact pipelines (inside section_pipeline).
        section_fp8_dit(args, rec, device, dit, exact, keep_bf16=True)
    if pipeline:
        dit.disable_speed()
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            te = build_text_encoder(args.tiny, device, torch.bfloat16, Path(folder))
            vae = build_vae(args.tiny, device, torch.bfloat16)
            sync(device)
            rec.add("imagezoo", {"op": "build", "what": "text_encoder+vae"}, s=round(time.perf_counter() - t0, 1))
            holder = {"ref": ref}
            ref = None
            section_pipeline(args, rec, device, dit, te, vae, holder)
        if "dit" in args.sections:  # FP8 forward rows, now on FP8-only weights
            section_fp8_dit(args, rec, device, dit, exact, keep_bf16=False)

    result["total_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    print(f"wrote {args.out} ({len(rec.rows)} rows, {result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
