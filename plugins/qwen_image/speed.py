"""Speed options for the Qwen-Image DiT, and the `--speed` profiles that combine them.

Exact options (same function, float rounding aside):

- attention kernel choice (`attention.py`; the model's default "auto" already picks the fastest known-good one);
- regional `torch.compile` of the repeated block: one compiled graph serves the blocks (their code is shared and
  parameters are graph inputs), which fuses modulation, LayerNorm, q/k RMSNorm, RoPE, GELU and the gated residuals.
  Sequence lengths are dynamic from the first compile, so new resolutions and prompt lengths reuse the graph;
  `CompileCounter` counts every graph compiled, so a benchmark can show that nothing recompiles after warm-up;
- the MLP up-projection with its GELU in the GEMM epilogue (`fused.linear_gelu_tanh`);
- q/k RMSNorm + RoPE of both streams written straight into the joint attention input (`fused.joint_qk_norm_rope`),
  and the image values written by their projection into the joint values (`fused.linear_after`);
- each block's modulated LayerNorms, the second with the gated residual before it, in one pass
  (`fused.modulate_norm`, `fused.residual_modulate_norm`);
- CUDA graphs of the forward inside a sampling loop (`cuda_graph`, `sampling.py`): recorded at the second step,
  replayed after, so the GPU never waits on Python between kernels.

Lossy options (opt-in, their cost measured in docs/benchmarks.md):

- FP8 compute: the block linears run as FP8 x FP8 matmuls (`torch._scaled_mm`) with per-output-channel weight scales
  and per-token activation scales computed on the fly, on GPUs with FP8 tensor cores (compute capability >= 8.9);
  elsewhere the same rounding runs through the device's `_scaled_mm` or float32 emulation (for tests; no speed-up).
- Step caching (`FirstBlockCache`): each step runs the first block(s); when their residual changed less than
  `threshold` (mean relative L1) since the last fully computed step, the other blocks are skipped and their residual
  from that step is reused.

Profiles (`PROFILES`): "off", "auto"/"exact" (best exact settings for the device), "fp8", "cache", "fastest"
(fp8 + cache). The step cache decides on the host at every step, so the cache profiles go without CUDA graphs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import types
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from imagezoo.errors import InputError
from imagezoo.plugins.qwen_image.attention import check_backend

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from imagezoo.plugins.qwen_image.dit import QwenImageDiT

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Block linears that run in FP8 under `fp8`. The modulation linears (`img_mod.1`, `txt_mod.1`) produce every block's
# shift/scale/gate and stay in bf16 unless `fp8_modulation` is set; layers outside the blocks are never converted.
FP8_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
FP8_MODULATION_TARGETS = ("img_mod.1", "txt_mod.1")
# Dynamo keeps this many compiled variants per code object; the block needs a handful (batch 1 vs >1, mask or not,
# last block without text output), far below this.
_RECOMPILE_LIMIT = 64


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and profiles


@dataclass(frozen=True)
class SpeedConfig:
    """Every speed knob of the DiT. The defaults change nothing.

    Attributes:
        attention: Attention backend (`attention.BACKENDS`).
        compile: Regional `torch.compile` of the blocks.
        compile_backend: torch.compile backend ("inductor"; "eager"/"aot_eager" for tests).
        dynamic: Compile with dynamic sequence lengths (no recompiles for new sizes).
        fused_gelu: Run the MLP up-projections with bias and GELU in the GEMM epilogue (`fused.linear_gelu_tanh`;
            inference only, layers with LoRA/FP8 hooks keep the plain path).
        fused_qk: Normalize and rotate q/k of both streams straight into the joint attention input
            (`fused.joint_qk_norm_rope`, Triton on CUDA), and have the image V projection write into the joint
            values (`fused.linear_after`), instead of per stream, then copied.
        fused_norm: Run each block's modulated LayerNorms, the one after attention together with the gated residual
            update before it, as one-pass ops (`fused.modulate_norm`, `fused.residual_modulate_norm`; Triton on
            CUDA) instead of inductor's reductions.
        cuda_graph: Inside a sampling loop (`QwenImageDiT.sampling`), capture the forward into a CUDA graph at the
            second step and replay it at the later ones (CUDA only; not with `step_cache`).
        modulation_tables: Inside a sampling loop, compute every block's modulation for all steps at the first
            (`QwenImageDiT.modulation_tables`; exact, on by default).
        fp8: FP8 compute for the block linears (lossy).
        fp8_modulation: Also run the modulation linears in FP8 (more loss, less weight traffic).
        fp8_keep_bf16: Keep the bf16 weights next to the FP8 copies (+50% DiT memory; `disable_speed` restores them
            exactly). When False the bf16 weights are freed and restoring dequantizes the FP8 ones (lossy).
        step_cache: None (off), or the first-block-cache threshold (mean relative change of the first blocks'
            residual below which a step reuses the previous residual of the other blocks; 0 never skips).
        cache_warmup: Steps always computed in full at the start of each generation.
        cache_max_skips: Most consecutive skipped steps (None: unbounded).
        cache_head_blocks: Blocks always run at each step (their residual drives the decision).
    """

    attention: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    dynamic: bool = True
    fused_gelu: bool = False
    fused_qk: bool = False
    fused_norm: bool = False
    cuda_graph: bool = False
    modulation_tables: bool = True
    fp8: bool = False
    fp8_modulation: bool = False
    fp8_keep_bf16: bool = True
    step_cache: float | None = None
    cache_warmup: int = 2
    cache_max_skips: int | None = 3
    cache_head_blocks: int = 1

    def __post_init__(self) -> None:
        check_backend(self.attention)
        if self.step_cache is not None and not self.step_cache >= 0:
            raise InputError(f"step_cache={self.step_cache!r} must be a threshold >= 0, or None to disable it.")
        if self.cache_warmup < 0 or self.cache_head_blocks < 1:
            raise InputError(
                f"cache_warmup={self.cache_warmup!r} must be >= 0 and cache_head_blocks={self.cache_head_blocks!r} "
                ">= 1."
            )
        if self.cache_max_skips is not None and self.cache_max_skips < 1:
            raise InputError(f"cache_max_skips={self.cache_max_skips!r} must be >= 1, or None for no limit.")
        if self.cuda_graph and self.step_cache is not None:
            raise InputError(
                f"cuda_graph=True cannot go with step_cache={self.step_cache!r}: the cache decides on the host at "
                "every step, which a replayed graph cannot; set one of them off."
            )

    @property
    def exact(self) -> bool:
        """Whether these settings compute the same function as the default path."""
        return not self.fp8 and self.step_cache is None


# Step-cache threshold of the "cache" profiles: see docs/benchmarks.md for the skip rate and error it gave.
DEFAULT_CACHE_THRESHOLD = 0.2

_EXACT: dict[str, Any] = {
    "compile": True,
    "fused_gelu": True,
    "fused_qk": True,
    "fused_norm": True,
    "cuda_graph": True,
}
# FP8 leaves the modulation tables off: with them the FP8 CFG-batch forward ran slower, not faster, unlike the bf16
# one (H100, 1024² pipeline: 12.06 s against 11.05; cause not found). It leaves the fused norms off too: inductor
# fuses the norms with the FP8 activation quantization after them, which the ops would split (11.56 s with them;
# benchmarks/results/speed_pipeline.json).
_FP8: dict[str, Any] = {**_EXACT, "fp8": True, "modulation_tables": False, "fused_norm": False}
_CACHE: dict[str, Any] = {"cuda_graph": False, "step_cache": DEFAULT_CACHE_THRESHOLD}
PROFILES: dict[str, dict[str, Any]] = {
    "off": {},
    "exact": _EXACT,
    "fp8": _FP8,
    "cache": {**_EXACT, **_CACHE},
    "fastest": {**_FP8, **_CACHE},
}
PROFILE_NAMES = ("auto", *PROFILES)
"""Names `--speed` takes; "auto" is "exact" where it pays (CUDA with Triton), else "off"."""


def compile_available(device: torch.device) -> bool:
    """Whether inductor can generate kernels for `device` (Triton on CUDA, a C compiler on CPU)."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "cl"))


def fp8_supported(device: torch.device) -> bool:
    """Whether the device has FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_profile(profile: str | SpeedConfig, device: torch.device, **overrides: Any) -> SpeedConfig:
    """Turn a profile name (or config) plus explicit overrides into the settings to apply on `device`.

    "auto" is the best exact profile for the device: regional compile on CUDA when Triton is installed, nothing
    on CPU (compiling a float32 CPU model mostly costs start-up time). A profile asking for compile where inductor
    can't run drops it with a warning; CUDA graphs are dropped off CUDA (with a warning when asked for by name), and
    so are a profile's fused norms (kept when asked for by name); FP8 off FP8 hardware stays on (same rounding, no
    speed-up; `enable_speed` warns).

    Raises:
        InputError: Unknown profile name or option.
    """
    if isinstance(profile, SpeedConfig):
        base = profile
    else:
        if profile not in PROFILE_NAMES:
            raise InputError(f"Unknown speed profile {profile!r}; use one of {', '.join(PROFILE_NAMES)}.")
        if profile == "auto":
            profile = "exact" if device.type == "cuda" and compile_available(device) else "off"
        base = SpeedConfig(**PROFILES[profile])
    unknown = sorted(set(overrides) - set(asdict(base)))
    if unknown:
        raise InputError(f"Unknown speed option(s) {', '.join(unknown)}; allowed: {', '.join(asdict(base))}.")
    config = replace(base, **overrides)
    if config.compile and config.compile_backend == "inductor" and not compile_available(device):
        logger.warning("torch.compile needs %s for %s; running uncompiled.", _compiler_need(device), device)
        config = replace(config, compile=False)
    if config.cuda_graph and device.type != "cuda":
        # Part of the exact profiles everywhere; worth a warning only when asked for by name.
        log = logger.warning if overrides.get("cuda_graph") else logger.debug
        log("CUDA graphs need a CUDA device, not %s; running without.", device)
        config = replace(config, cuda_graph=False)
    if config.fused_norm and device.type != "cuda" and "fused_norm" not in overrides:
        # A profile's choice: the op's kernel is CUDA's; elsewhere the block's own ops are as fast and bit-exact.
        config = replace(config, fused_norm=False)
    return config


def _compiler_need(device: torch.device) -> str:
    return "Triton" if device.type == "cuda" else "a C compiler"


# ----------------------------------------------------------------------------------------------------------------------
# Applying and removing


@dataclass
class SpeedState:
    """What `enable_speed` applied to a DiT (kept on it as `_speed_state` until `disable_speed`)."""

    config: SpeedConfig
    counter: CompileCounter | None = None
    fp8_mode: str | None = None
    cache: FirstBlockCache | None = None
    previous_attention: str = "auto"

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (for logs and benchmark JSON)."""
        summary: dict[str, Any] = {"config": asdict(self.config), "fp8_mode": self.fp8_mode}
        if self.counter is not None:
            summary["compiles"] = self.counter.compiles
        if self.cache is not None:
            summary["cache"] = self.cache.stats()
        return summary


def enable_speed(dit: QwenImageDiT, profile: str | SpeedConfig = "auto", **overrides: Any) -> SpeedState:
    """Apply a speed profile (or explicit settings) to `dit`, replacing any applied before.

    Args:
        dit: The model; its weights should already be on the device they will run on.
        profile: A name from `PROFILE_NAMES` or a `SpeedConfig`.
        **overrides: `SpeedConfig` fields overriding the profile's (e.g. `step_cache=0.08`).

    Returns:
        The applied state (also kept on the model; `disable_speed` undoes it).
    """
    disable_speed(dit)
    device = dit.img_in.weight.device
    config = resolve_profile(profile, device, **overrides)
    state = SpeedState(config=config, previous_attention=dit.attention_backend)
    dit.set_attention_backend(config.attention)
    set_fused_ops(dit, gelu=config.fused_gelu, qk=config.fused_qk, norm=config.fused_norm)
    dit.cuda_graph = config.cuda_graph
    dit.modulation_tables = config.modulation_tables
    if config.fp8:
        state.fp8_mode = enable_fp8_compute(
            dit, modulation=config.fp8_modulation, keep_bf16=config.fp8_keep_bf16, device=device
        )
        if not fp8_supported(device):
            logger.warning(
                "%s has no FP8 tensor cores: FP8 compute runs as %r, with FP8 rounding but no speed-up.",
                device,
                state.fp8_mode,
            )
    if config.compile:
        state.counter = compile_blocks(dit, backend=config.compile_backend, dynamic=config.dynamic)
    if config.step_cache is not None:
        state.cache = FirstBlockCache(
            threshold=config.step_cache,
            warmup_steps=config.cache_warmup,
            max_skips=config.cache_max_skips,
            head_blocks=config.cache_head_blocks,
        )
        dit.step_cache = state.cache
    dit._speed_state = state
    logger.info("Speed settings applied: %s", state.describe())
    return state


def disable_speed(dit: QwenImageDiT) -> None:
    """Undo `enable_speed` (no-op when nothing is applied)."""
    state: SpeedState | None = getattr(dit, "_speed_state", None)
    if state is None:
        return
    if state.cache is not None and dit.step_cache is state.cache:
        dit.step_cache = None
    if state.counter is not None:
        uncompile_blocks(dit)
    if state.fp8_mode is not None:
        disable_fp8_compute(dit)
    set_fused_ops(dit, gelu=False, qk=False, norm=False)
    dit.cuda_graph = False
    dit.modulation_tables = True
    dit.set_attention_backend(state.previous_attention)
    dit._speed_state = None


def set_fused_ops(dit: QwenImageDiT, *, gelu: bool, qk: bool, norm: bool) -> None:
    """Switch the fused ops of every block (`SpeedConfig.fused_gelu`, `fused_qk` and `fused_norm`)."""
    for block in dit.transformer_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            mlp.net[0].fused_gelu = gelu
        block.attn.fused_qk = qk
        block.fused_norm = norm


# ----------------------------------------------------------------------------------------------------------------------
# Regional compilation


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles, then hands them to the real backend.

    Every first compile and every recompile passes through here once, so `compiles` after warm-up minus before is
    the number of recompiles.
    """

    def __init__(self, backend: str = "inductor", dynamic: bool = True) -> None:
        self.backend = backend
        self.dynamic = dynamic
        self.compiles = 0
        self._compile: Callable[..., Any] = torch._dynamo.lookup_backend(backend)

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.compiles += 1
        logger.debug("torch.compile: graph #%d (%d nodes)", self.compiles, len(graph.graph.nodes))
        return self._compile(graph, example_inputs)


def compile_blocks(dit: QwenImageDiT, *, backend: str = "inductor", dynamic: bool = True) -> CompileCounter:
    """Compile the blocks in place (`nn.Module.compile`); all blocks share the compiled graphs.

    The last block stays eager: it is the only one without text output, so compiling it would cost a graph variant
    of its own (tens of seconds of warm-up) to save ~1/60 of the fusion gain.

    Returns:
        The counter of graphs compiled by these blocks. It is kept on the model and reused by later calls with the
        same settings: dynamo's cache is per backend object, so re-enabling after `disable_speed` compiles nothing new.
    """
    counter = getattr(dit, "_compile_counter", None)
    if not isinstance(counter, CompileCounter) or (counter.backend, counter.dynamic) != (backend, dynamic):
        counter = CompileCounter(backend, dynamic)
        dit._compile_counter = counter
    config = torch._dynamo.config
    # One entry per code object is not enough for batch 1 / batch N / masked / last-block variants.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    # "Duck sizing" assumes two sizes that happen to be equal at the first call (say 64 text tokens and 64 image
    # tokens) are the same symbol, and recompiles when they part. Sizes here coincide by accident only.
    shape_config = getattr(torch.fx.experimental, "_config", None)
    if shape_config is not None and hasattr(shape_config, "use_duck_shape"):
        shape_config.use_duck_shape = False
    blocks = list(dit.transformer_blocks)
    for block in blocks[:-1] if len(blocks) > 1 else blocks:
        block.compile(backend=counter, dynamic=dynamic)
    return counter


def uncompile_blocks(dit: QwenImageDiT) -> None:
    """Run the blocks eagerly again."""
    for block in dit.transformer_blocks:
        block._compiled_call_impl = None


# ----------------------------------------------------------------------------------------------------------------------
# FP8 compute


def quantize_fp8_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize each row of `x` (..., K) to float8_e4m3fn with its own scale (amax / 448).

    Returns:
        `(q, scale)`: `q` float8 of `x`'s shape, `scale` float32 (..., 1), with `x ≈ q.float() * scale`.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, mode: str, out_dtype: torch.dtype
) -> Tensor:
    """`x @ W.T + b` with `x` quantized per token and `W` (float8, (N, K)) per output channel.

    Args:
        x: (..., K) activations.
        weight: (N, K) float8_e4m3fn weight.
        weight_scale: (1, N) float32 per-output-channel scales.
        bias: (N,) or None.
        mode: "scaled_mm" (FP8 tensor cores, bias fused), "scaled_mm_bias" (bias added after) or "emulate"
            (float32 maths on the dequantized values: the same rounding, for devices without FP8 matmul).
        out_dtype: Output dtype.
    """
    shape = x.shape
    xq, x_scale = quantize_fp8_rowwise(x.reshape(-1, shape[-1]))
    if mode == "emulate":
        out = (xq.float() * x_scale) @ (weight.float() * weight_scale.reshape(-1, 1)).t()
        if bias is not None:
            out = out + bias.float()
        out = out.to(out_dtype)
    else:
        fused = mode == "scaled_mm"
        out = torch._scaled_mm(
            xq,
            weight.t(),
            scale_a=x_scale,
            scale_b=weight_scale,
            bias=bias if fused else None,
            out_dtype=out_dtype,
        )
        if bias is not None and not fused:
            out = out + bias
    return out.reshape(*shape[:-1], -1)


def _fp8_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, self._fp8_mode, x.dtype)


@functools.cache
def _probe_fp8_mode(device_type: str, index: int | None, out_dtype: torch.dtype) -> str:
    """The fastest FP8 path this device and torch build actually run, tried once on a small product."""
    device = torch.device(device_type, index)
    if device.type == "cuda" and not fp8_supported(device):
        return "emulate"
    x = torch.randn(40, 64, device=device, dtype=out_dtype)  # 40 rows: token counts need not be multiples of 16
    weight, scale = quantize_fp8_rowwise(torch.randn(48, 64, device=device))
    bias = torch.randn(48, device=device, dtype=out_dtype)
    expected = fp8_linear(x, weight, scale.reshape(1, -1), bias, "emulate", torch.float32)
    for mode in ("scaled_mm", "scaled_mm_bias"):
        try:
            out = fp8_linear(x, weight, scale.reshape(1, -1), bias, mode, out_dtype).float()
        except (RuntimeError, NotImplementedError) as exc:  # unsupported layout/dtype in this torch build
            logger.debug("FP8 mode %s unavailable on %s: %s", mode, device, exc)
            continue
        if torch.allclose(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()):
            return mode
        logger.warning("FP8 mode %s gave wrong results on %s; not used.", mode, device)
    return "emulate"


def fp8_linears(dit: QwenImageDiT, modulation: bool = False) -> list[tuple[str, nn.Linear]]:
    """The block linears FP8 compute converts, by qualified name."""
    targets = FP8_TARGETS + (FP8_MODULATION_TARGETS if modulation else ())
    found = []
    for index, block in enumerate(dit.transformer_blocks):
        for name in targets:
            module = block.get_submodule(name)
            if not isinstance(module, nn.Linear):  # pragma: no cover - the architecture fixes these names
                raise InputError(f"transformer_blocks.{index}.{name} is {type(module).__name__}, not nn.Linear.")
            found.append((f"transformer_blocks.{index}.{name}", module))
    return found


@torch.no_grad()
def enable_fp8_compute(
    dit: QwenImageDiT, *, modulation: bool = False, keep_bf16: bool = True, device: torch.device | None = None
) -> str:
    """Quantize the block linears' weights to FP8 and route their forward through `fp8_linear`.

    The FP8 weights and scales are non-persistent buffers (`weight_fp8`, `weight_scale`), so they follow the module
    across devices and stay out of `state_dict()`. With `keep_bf16=False` the bf16 weight is replaced by the FP8
    one (half the memory; `disable_fp8_compute` then dequantizes).

    Returns:
        The FP8 mode used ("scaled_mm", "scaled_mm_bias" or "emulate").
    """
    device = device or dit.img_in.weight.device
    mode = _probe_fp8_mode(device.type, device.index, dit._dtype())
    for _, linear in fp8_linears(dit, modulation):
        if hasattr(linear, "weight_fp8"):
            continue
        weight_fp8, scale = quantize_fp8_rowwise(linear.weight)
        linear.register_buffer("weight_fp8", weight_fp8, persistent=False)
        linear.register_buffer("weight_scale", scale.reshape(1, -1), persistent=False)
        linear._fp8_mode = mode
        if not keep_bf16:
            linear._fp8_bf16_dtype = linear.weight.dtype
            linear.weight = nn.Parameter(weight_fp8, requires_grad=False)  # shares the buffer's storage
        linear.forward = types.MethodType(_fp8_forward, linear)
    return mode


@torch.no_grad()
def disable_fp8_compute(dit: QwenImageDiT) -> None:
    """Restore the plain bf16 forward of every converted linear."""
    dequantized = 0
    for _, linear in fp8_linears(dit, modulation=True):
        if not hasattr(linear, "weight_fp8"):
            continue
        dtype = getattr(linear, "_fp8_bf16_dtype", None)
        if dtype is not None:
            linear.weight = nn.Parameter(
                (linear.weight_fp8.float() * linear.weight_scale.reshape(-1, 1)).to(dtype), requires_grad=False
            )
            del linear._fp8_bf16_dtype
            dequantized += 1
        del linear.weight_fp8, linear.weight_scale, linear._fp8_mode, linear.forward
    if dequantized:
        logger.warning(
            "%d linears got their weights back from FP8 (bf16 copies were not kept): values are rounded.", dequantized
        )


# ----------------------------------------------------------------------------------------------------------------------
# Step caching


class FirstBlockCache:
    """First-block residual cache: skip the other blocks on steps where the first blocks barely changed.

    Each denoising step (one DiT forward) runs the first `head_blocks` blocks. After `warmup_steps` full steps, if
    the mean relative L1 change of their residual since the last fully computed step is below `threshold`, the other
    blocks are skipped and their residual from that step is added instead. A new generation is detected when sigma
    stops decreasing or the shapes change, and starts from a clean state.

    Args:
        threshold: Skip when the change is below this (0 never skips; larger skips more, at a quality cost).
        warmup_steps: Steps computed in full at the start of each generation.
        max_skips: Most consecutive skipped steps (None: unbounded).
        head_blocks: Blocks run at every step.

    Attributes:
        history: The change measured at each eligible step of the current generation (to calibrate `threshold`).
    """

    def __init__(
        self, threshold: float, warmup_steps: int = 2, max_skips: int | None = 3, head_blocks: int = 1
    ) -> None:
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.max_skips = max_skips
        self.head_blocks = head_blocks
        self.steps = 0
        self.skipped = 0
        self.total_steps = 0
        self.total_skipped = 0
        self._key: tuple[Any, ...] | None = None
        self._last_sigma: float | None = None
        self._ref_residual: Tensor | None = None
        self._tail_residual: Tensor | None = None
        self._consecutive = 0
        self.history: list[float] = []

    def reset(self) -> None:
        """Forget the previous generation (called automatically when a new one starts)."""
        self.steps = self.skipped = self._consecutive = 0
        self._key = self._last_sigma = self._ref_residual = self._tail_residual = None
        self.history = []

    def stats(self) -> dict[str, int]:
        """Steps seen and skipped, in the current generation and in total."""
        return {
            "steps": self.steps,
            "skipped": self.skipped,
            "total_steps": self.total_steps,
            "total_skipped": self.total_skipped,
        }

    def __call__(
        self,
        dit: QwenImageDiT,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | tuple[int, ...] | None,
        sigma: Tensor,
    ) -> Tensor:
        """Run one step's blocks (see `dit.StepCache`)."""
        mask_key = mask if mask is None or isinstance(mask, tuple) else tuple(mask.shape)
        key = (tuple(img.shape), tuple(txt.shape), mask_key, img.device)
        level = float(sigma.max())  # one host sync per step; the skip decision needs one anyway
        if key != self._key or self._last_sigma is None or level >= self._last_sigma:
            self.reset()
            self._key = key
        self._last_sigma = level
        self.steps += 1
        self.total_steps += 1

        n_blocks = len(dit.transformer_blocks)
        head = min(self.head_blocks, n_blocks)
        head_img, head_txt = dit.run_blocks(0, head, img, txt, temb_act, img_freqs, txt_freqs, mask)
        residual = head_img.float() - img.float()
        if self._can_skip(residual):
            self.skipped += 1
            self.total_skipped += 1
            self._consecutive += 1
            assert self._tail_residual is not None  # set with _ref_residual
            return (head_img.float() + self._tail_residual).to(head_img.dtype)
        out, _ = dit.run_blocks(head, n_blocks, head_img, head_txt, temb_act, img_freqs, txt_freqs, mask)
        self._ref_residual = residual
        self._tail_residual = out.float() - head_img.float()
        self._consecutive = 0
        return out

    def _can_skip(self, residual: Tensor) -> bool:
        if self._ref_residual is None or self.steps <= self.warmup_steps:
            return False
        if self.max_skips is not None and self._consecutive >= self.max_skips:
            return False
        reference = self._ref_residual
        change = float((residual - reference).abs().mean() / reference.abs().mean().clamp(min=1e-12))
        self.history.append(change)
        return change < self.threshold


def enable_step_cache(dit: QwenImageDiT, threshold: float, **options: Any) -> FirstBlockCache:
    """Attach a `FirstBlockCache` to `dit` (lossy; `dit.step_cache = None` removes it)."""
    cache = FirstBlockCache(threshold, **options)
    dit.step_cache = cache
    return cache
