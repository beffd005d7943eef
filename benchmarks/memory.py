"""Peak VRAM, host RAM and seconds per denoising step of the memory strategies, full-size Qwen-Image, 1328x1328.

Weights are random (built on the meta device, allocated on the GPU, filled in place): memory and time do not depend
on their values. Every case runs in its own process, so host RAM and the CUDA allocator start clean. One generation
per case: the first denoising step is the warm-up, the others are timed (median). Text encoding and decoding times
are those of the same call (they include moving the component in, as every call with offload pays).

    python benchmarks/memory.py                              # imagezoo and DiffSynth-Studio, all cases, CUDA
    python benchmarks/memory.py --impl imagezoo --cases none,min
    python benchmarks/memory.py --tiny --device cpu           # smoke check (tiny models, 64x64)

Peak VRAM is `torch.cuda.max_memory_reserved` (what the process holds from the driver, CUDA context excluded),
tracked per phase (encode / denoise / decode), next to `torch.cuda.max_memory_allocated`. Host RAM is the peak
resident set size (`/proc/self/statm`) sampled every 20 ms during the call. Streamed loads per step are the block
loads the placement strategies count (`stats["streamed_loads"]`) during the denoising steps, divided by the steps.
Writes `benchmarks/results/memory.json` (`memory_tiny.json` with `--tiny`).

The reference is DiffSynth-Studio (`diffsynth` on PyPI) with its own VRAM management configured as its
documentation does for each memory level; its models are built the same way (random weights, no files).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from report import versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
PROMPT = "Exquisite portrait, underwater girl, blue dress flowing, hair floating, translucent light, bubbles"
NEGATIVE = ""
# Our case -> (imagezoo strategies, options), and the DiffSynth vram_config/vram_limit at the nearest setting
# (its documentation: none 56 GB, CPU offload 40 GB, FP8 + offload 21 GB, dynamic vram_limit).
CASES: dict[str, dict[str, Any]] = {
    "none": {"imagezoo": ([], {}), "diffsynth": (None, None)},
    "offload": {"imagezoo": (["offload"], {}), "diffsynth": (("bf16", "cpu", "bf16", "cuda"), None)},
    "fp8": {"imagezoo": (["fp8"], {"keep_original": False}), "diffsynth": (("fp8", "cuda", "fp8", "cuda"), None)},
    "fp8_offload": {
        "imagezoo": (["fp8", "offload"], {"keep_original": False}),
        "diffsynth": (("fp8", "cpu", "fp8", "cuda"), None),
    },
    "budget12": {"imagezoo": (["stream"], {"vram_limit": 12}), "diffsynth": (("bf16", "cpu", "bf16", "cpu"), 12)},
    "min": {"imagezoo": (["stream"], {"vram_limit": 0}), "diffsynth": (("bf16", "cpu", "bf16", "cpu"), 0)},
    "fp8_min": {
        "imagezoo": (["fp8", "stream"], {"vram_limit": 0, "keep_original": False}),
        "diffsynth": (("fp8", "cpu", "fp8", "cpu"), 0),
    },
}
DEFAULT_CASES = ["none", "offload", "fp8", "fp8_offload", "budget12", "min", "fp8_min"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="imagezoo,diffsynth", help="comma-separated: imagezoo, diffsynth")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated from {list(CASES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1328; tiny: 64)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per call; the first is the warm-up")
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale (CFG doubles the DiT work)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a fast smoke check")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case before it is killed")
    parser.add_argument("--deadline", type=float, help="Unix time after which no case starts (and cases are cut)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check", action="store_true", help="only check exactness on the tiny model, then exit")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1328)
    args.out = args.out or RESULTS / ("memory_tiny.json" if args.tiny else "memory.json")
    return args


# ------------------------------------------------------------------------------------------------------------------
# measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size while running, sampled on a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def streamed_loads(pipe: Any) -> int:
    """Streamed block loads so far, summed over the pipeline's memory strategies that count them (0 for none)."""
    return sum(getattr(s, "stats", {}).get("streamed_loads", 0) for s in getattr(pipe, "memory_strategies", []))


class StepTimer:
    """A `progress_bar_cmd` for both pipelines: marks the time after each step, and the peak VRAM and the streamed
    block loads so far (`counter`) at the end of each phase."""

    def __init__(self, device: torch.device, counter: Any = None) -> None:
        self.device = device
        self.counter = counter
        self.marks: list[float] = []
        self.peaks: dict[str, dict[str, float]] = {}
        self.loads: dict[str, int] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def phase(self, name: str) -> None:
        self.sync()
        if self.counter is not None:
            self.loads[name] = self.counter()
        if self.device.type == "cuda":
            self.peaks[name] = {
                "reserved": torch.cuda.max_memory_reserved(self.device) / GIB,
                "allocated": torch.cuda.max_memory_allocated(self.device) / GIB,
            }
            torch.cuda.reset_peak_memory_stats(self.device)

    def __call__(self, iterable: Any) -> Any:
        def steps() -> Any:
            self.phase("encode")
            self.marks.append(time.perf_counter())
            for item in iterable:
                yield item
                self.sync()
                self.marks.append(time.perf_counter())
            self.phase("denoise")

        return steps()


# ------------------------------------------------------------------------------------------------------------------
# building random full-size models


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 0.02), norm scales 1, biases 0: finite activations through 60 blocks."""
    gen = None
    for name, p in module.named_parameters():
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name or name.endswith("gamma") or name.endswith(".weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Allocate a meta-built module's parameters on `device` in `dtype`; real buffers keep their values."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    module.to_empty(device=device)
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value.to(device))
    fill_random(module)
    return module.eval().requires_grad_(False)


def tokenizer_folder() -> Path:
    from imagezoo.plugins.qwen_image.tokenizer import write_offline_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="imagezoo-tok-"))
    write_offline_tokenizer(folder)
    return folder


def build_imagezoo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from imagezoo.interfaces import Components
    from imagezoo.plugin_manager import get_kernel
    from imagezoo.plugins.qwen_image.dit import REAL_DIT, TINY_DIT, QwenImageDiT
    from imagezoo.plugins.qwen_image.family import QwenDenoiser
    from imagezoo.plugins.qwen_image.pipeline import QwenImagePipeline
    from imagezoo.plugins.qwen_image.text_encoder import REAL_TEXT_ENCODER, TINY_TEXT_ENCODER, QwenTextEncoder
    from imagezoo.plugins.qwen_image.tokenizer import load_tokenizer
    from imagezoo.plugins.qwen_image.vae import REAL_VAE, TINY_VAE, QwenImageVAE

    with torch.device("meta"):
        dit = QwenImageDiT(TINY_DIT if args.tiny else REAL_DIT)
        vae = QwenImageVAE(TINY_VAE if args.tiny else REAL_VAE)
        text = Qwen2_5_VLTextModel((TINY_TEXT_ENCODER if args.tiny else REAL_TEXT_ENCODER).text_config())
    dit, vae, text = (materialize(m, device, dtype) for m in (dit, vae, text))
    text.rotary_emb = type(text.rotary_emb)(config=text.config).to(device)  # inv_freq: fp32, computed
    encoder = QwenTextEncoder(text, load_tokenizer(tokenizer_folder()))
    components = Components(encoder, QwenDenoiser(dit), vae, {"dit": dit, "text_encoder": text, "vae": vae})
    defaults = get_kernel().models.get("Qwen/Qwen-Image").defaults
    return QwenImagePipeline(components, defaults=defaults, device=device, dtype=dtype)


def _stub_missing(name: str, **attrs: Any) -> None:
    """DiffSynth imports a few packages at import time that text-to-image never uses; stub them where absent."""
    import importlib.machinery
    import types

    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for key, value in attrs.items():
            setattr(module, key, value)
        sys.modules[name] = module


def build_diffsynth(args: argparse.Namespace, case: str, device: torch.device, dtype: torch.dtype) -> Any:
    _stub_missing("pandas")
    _stub_missing("modelscope", snapshot_download=None)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # Only its data helpers import torchvision. Resolve the transformers classes it uses first: a stub would
        # make transformers believe torchvision is installed.
        from transformers import Qwen2_5_VLModel, Siglip2VisionModel  # noqa: F401

        _stub_missing("torchvision")
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"] = type(sys)("transforms")
    os.environ.setdefault("DIFFSYNTH_ATTENTION_IMPLEMENTATION", "torch")
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen_vl

    # Newer transformers renamed a class DiffSynth's module map names; alias it so its map resolves.
    if not hasattr(qwen_vl, "Qwen2_5_VisionRotaryEmbedding") and hasattr(qwen_vl, "Qwen2_5_VLVisionRotaryEmbedding"):
        qwen_vl.Qwen2_5_VisionRotaryEmbedding = qwen_vl.Qwen2_5_VLVisionRotaryEmbedding
    from diffsynth.core.vram.layers import enable_vram_management
    from diffsynth.models.model_loader import ModelPool
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from diffsynth.models.qwen_image_vae import QwenImageVAE
    from diffsynth.pipelines.qwen_image import QwenImageBlockwiseMultiControlNet, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    from imagezoo.plugins.qwen_image.tokenizer import load_tokenizer

    # Parameters on meta (skip_model_initialization style), plain tensors such as RoPE tables real.
    with _meta_parameters():
        dit = QwenImageDiT(num_layers=1 if args.tiny else 60)
        vae = QwenImageVAE()
        if args.tiny:
            text = _tiny_diffsynth_text_encoder(QwenImageTextEncoder, Qwen2_5_VLConfig, Qwen2_5_VLModel)
        else:
            text = QwenImageTextEncoder()
    models = {"dit": dit, "text_encoder": text, "vae": vae}
    for name in models:
        models[name] = materialize(models[name], device, dtype)
    setting, vram_limit = CASES[case]["diffsynth"]
    if setting is not None:
        names = {"bf16": dtype, "fp8": torch.float8_e4m3fn}
        offload_dtype, offload_device, onload_dtype, onload_device = (
            str(device) if v == "cuda" else v for v in setting
        )
        vram_config = {
            "offload_dtype": names[offload_dtype],
            "offload_device": offload_device,
            "onload_dtype": names[onload_dtype],
            "onload_device": onload_device,
            "preparing_dtype": names[onload_dtype],
            "preparing_device": str(device),
            "computation_dtype": dtype,
            "computation_device": str(device),
        }
        classes = {
            "dit": "diffsynth.models.qwen_image_dit.QwenImageDiT",
            "text_encoder": "diffsynth.models.qwen_image_text_encoder.QwenImageTextEncoder",
            "vae": "diffsynth.models.qwen_image_vae.QwenImageVAE",
        }
        pool = ModelPool()
        for name, model in models.items():
            # What its loader does: parameters loaded in the offload dtype on the offload device, then wrapped.
            for p in model.parameters():
                p.data = p.data.to(device=offload_device, dtype=vram_config["offload_dtype"])
            for module in model.modules():
                for key, buffer in list(module._buffers.items()):
                    if buffer is not None:
                        module._buffers[key] = buffer.to(offload_device)
            module_map = pool.fetch_module_map(classes[name], vram_config)
            models[name] = enable_vram_management(model, module_map, vram_config=vram_config, vram_limit=vram_limit)
        torch.cuda.empty_cache()
    if device.type == "cpu" and not hasattr(torch.cpu, "empty_cache"):
        # Its offload path assumes an accelerator; CPU smoke runs only.
        torch.cpu.empty_cache = lambda: None
        torch.cpu.mem_get_info = lambda device=None: (1 << 40, 1 << 40)
    pipe = QwenImagePipeline(device=str(device), torch_dtype=dtype)
    pipe.dit, pipe.text_encoder, pipe.vae = models["dit"], models["text_encoder"], models["vae"]
    pipe.blockwise_controlnet = QwenImageBlockwiseMultiControlNet(None)
    pipe.tokenizer = load_tokenizer(tokenizer_folder())
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    return pipe


class _meta_parameters:
    """Create parameters on the meta device (as DiffSynth's `skip_model_initialization`), buffers as usual."""

    def __enter__(self) -> None:
        self._old = torch.nn.Module.register_parameter

        def register(module: torch.nn.Module, name: str, param: Any) -> None:
            self._old(module, name, param)
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

        torch.nn.Module.register_parameter = register

    def __exit__(self, *exc: object) -> None:
        torch.nn.Module.register_parameter = self._old


def _tiny_diffsynth_text_encoder(cls: Any, config_cls: Any, model_cls: Any) -> Any:
    """DiffSynth's text encoder class with one layer (its DiT needs the real 3584 width)."""
    from imagezoo.plugins.qwen_image.text_encoder import TextEncoderParams

    params = TextEncoderParams(num_layers=1, intermediate_size=256)
    config = config_cls(**params.to_config())
    config.vision_config.depth = 1
    config.vision_config.fullatt_block_indexes = [0]
    text = cls.__new__(cls)
    torch.nn.Module.__init__(text)
    text.model = model_cls(config)
    text.lm_head = torch.nn.Linear(params.hidden_size, params.vocab_size, bias=False)
    text.config = config
    return text


# ------------------------------------------------------------------------------------------------------------------
# one case


def run_case(args: argparse.Namespace, impl: str, case: str) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setup_start = time.perf_counter()
    row: dict[str, Any] = {"impl": impl, "case": {"name": case}}
    if impl == "imagezoo":
        names, options = CASES[case]["imagezoo"]
        row["case"].update({"strategies": names, "options": options})
        pipe = build_imagezoo(args, device, dtype)
        if names:
            pipe.enable_memory(names, **options)
        call = {"negative_prompt": NEGATIVE, "output_type": "pil"}
    else:
        setting, vram_limit = CASES[case]["diffsynth"]
        row["case"].update({"vram_config": setting, "vram_limit": vram_limit})
        pipe = build_diffsynth(args, case, device, dtype)
        call = {"negative_prompt": NEGATIVE}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row["setup_s"] = round(time.perf_counter() - setup_start, 2)
    timer = StepTimer(device, (lambda: streamed_loads(pipe)) if impl == "imagezoo" else None)
    rss_before = rss_bytes()
    with RssSampler() as sampler:
        start = time.perf_counter()
        pipe(
            PROMPT,
            cfg_scale=args.cfg,
            height=args.size,
            width=args.size,
            seed=0,
            num_inference_steps=args.steps,
            tiled=True,
            progress_bar_cmd=timer,
            **call,
        )
        timer.phase("decode")
        end = time.perf_counter()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    timed = steps[1:] or steps
    loads_per_step = None
    if timer.loads and steps:  # imagezoo: the DiT's loads (the text encoder's fall in the encode phase)
        loads_per_step = round((timer.loads["denoise"] - timer.loads["encode"]) / len(steps), 2)
    row.update(
        {
            "peak_vram_gib": round(max((p["reserved"] for p in timer.peaks.values()), default=0.0), 3)
            if device.type == "cuda"
            else None,
            "peak_vram_allocated_gib": round(max((p["allocated"] for p in timer.peaks.values()), default=0.0), 3)
            if device.type == "cuda"
            else None,
            "phase_peak_vram_gib": {k: round(v["reserved"], 3) for k, v in timer.peaks.items()},
            "phase_peak_vram_allocated_gib": {k: round(v["allocated"], 3) for k, v in timer.peaks.items()},
            "streamed_loads_per_step": loads_per_step,
            "host_ram_gib": round(sampler.peak / GIB, 3),
            "host_ram_before_call_gib": round(rss_before / GIB, 3),
            "s_per_step": round(statistics.median(timed), 4),
            "step_times_s": [round(s, 4) for s in steps],
            "encode_s": round(timer.marks[0] - start, 3),
            "decode_s": round(end - timer.marks[-1], 3),
        }
    )
    return row


# ------------------------------------------------------------------------------------------------------------------
# orchestration


def worker(args: argparse.Namespace) -> int:
    impl, case = args.worker
    try:
        row = run_case(args, impl, case)
    except Exception as e:  # report the failure as a row (e.g. out of memory), never a made-up number
        traceback.print_exc()
        row = {"impl": impl, "case": {"name": case}, "error": f"{type(e).__name__}: {e}"[:500]}
    args.row_out.write_text(json.dumps(row))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| impl | case | peak VRAM GiB (reserved / allocated) | denoise peak GiB | streamed loads/step | host RAM GiB "
        "| s/step | encode s | decode s |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['case']['name']} | {r['error'][:60]} | | | | | | |")
            continue
        denoise = r["phase_peak_vram_gib"].get("denoise", "")
        loads = r.get("streamed_loads_per_step")
        lines.append(
            f"| {r['impl']} | {r['case']['name']} | {r['peak_vram_gib']} / {r.get('peak_vram_allocated_gib')} | "
            f"{denoise} | {'' if loads is None else loads} | {r['host_ram_gib']} | {r['s_per_step']} | "
            f"{r['encode_s']} | {r['decode_s']} |"
        )
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    """On the tiny model (float32, `--device`): every placement strategy equals the plain run bit for bit (with its
    CFG batch split per sample, as placement runs it), FP8 stays within its tolerance, and removing strategies
    restores the weights and the DiT's `split_batches` exactly. Exits non-zero on a mismatch."""
    import imagezoo
    from imagezoo.memory import module_slots

    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="imagezoo-models-"))
    pipe = imagezoo.load("tiny", device=str(device), torch_dtype=torch.float32, local_model_path=folder)
    # Fresh (aligned) allocations: CPU matrix-vector products round differently with the weight's address alignment,
    # tensors read from the files sit at arbitrary offsets, and placement strategies pack them aligned.
    for module in pipe.components.modules.values():
        for _, slot in module_slots(module):
            slot.set(slot.get().clone())
    dit = pipe.components.modules["dit"]
    call = {"height": 64, "width": 64, "num_inference_steps": 3, "seed": 1, "output_type": "latent"}
    call["progress_bar_cmd"] = lambda steps: steps
    reference = pipe("a cat", **call)
    dit.split_batches = True
    split_reference = pipe("a cat", **call)
    dit.split_batches = False

    def state() -> dict[str, torch.Tensor]:
        modules = pipe.components.modules.items()
        return {f"{c}.{k}": v for c, m in modules for k, v in m.state_dict().items()}

    weights = {k: v.clone() for k, v in state().items()}
    failures = []
    for names, options in [
        (["offload"], {}),
        (["stream"], {"vram_limit": 0}),
        (["disk"], {"vram_limit": 0}),
        (["fp8"], {}),
        (["fp8", "offload"], {}),
        (["fp8", "stream"], {"vram_limit": 0}),
    ]:
        pipe.enable_memory(names, **options)
        outputs = [pipe("a cat", **call) for _ in range(2)]
        pipe.disable_memory()
        expected = reference if names == ["fp8"] else split_reference
        error = max(((o - expected).norm() / expected.norm()).item() for o in outputs)
        exact = all(torch.equal(o, expected) for o in outputs)
        ok = exact if "fp8" not in names else error < 0.02
        restored = state()
        ok = ok and all(torch.equal(w, restored[k]) and restored[k].device == w.device for k, w in weights.items())
        ok = ok and not dit.split_batches
        print(f"check {names} {options}: {'exact' if exact else f'rel. error {error:.2e}'} -> {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(names)
    print("check:", "all ok" if not failures else f"FAILED {failures}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.check:
        return check(args)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES] + [i for i in impls if i not in ("imagezoo", "diffsynth")]
    if bad:
        raise SystemExit(f"Unknown case/impl {bad}; cases: {list(CASES)}, impls: imagezoo, diffsynth")
    rows = []
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTHONUNBUFFERED": "1"}
    for case in cases:
        for impl in impls:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                row_out = Path(f.name)
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            command += ["--worker", impl, case, "--row-out", str(row_out)]
            start = time.perf_counter()
            limit = args.timeout if args.deadline is None else min(args.timeout, args.deadline - time.time())
            if limit < 20:
                print(f"skipping {impl}/{case}: out of time", flush=True)
                continue
            try:
                subprocess.run(command, env=env, timeout=limit, check=False)
                row = json.loads(row_out.read_text() or "{}") or {
                    "impl": impl,
                    "case": {"name": case},
                    "error": "worker died without a result (killed? out of host memory?)",
                }
            except subprocess.TimeoutExpired:
                row = {"impl": impl, "case": {"name": case}, "error": f"timed out after {limit:.0f} s"}
            row["wall_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(args, argv, rows)  # after every case: a run cut short still leaves its rows
    print(table(rows))
    return 0


def write_results(args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]]) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else "cpu"
    result = {
        "name": "memory",
        "gpu": gpu,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "versions": versions("transformers", "diffsynth", "imagezoo"),
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/memory.py", *(argv or sys.argv[1:])]),
        "settings": {"size": args.size, "steps": args.steps, "timed_steps": max(1, args.steps - 1), "cfg": args.cfg},
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
