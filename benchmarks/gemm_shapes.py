"""The Qwen-Image DiT's linear shapes on one GPU: which arrangement of its GEMMs cuBLAS runs fastest.

Weights are random bf16 (several copies per shape, cycled, so that no GEMM finds its weight in L2); each case is
timed as 20 calls replayed from a CUDA graph, median of 7 replays. Sections:

    image   the image stream's linears at 8,192 rows (a 1024² CFG batch) against two GEMMs of 4,096 (per sample)
    text    the text stream's linears at 6 to 256 rows (weight-bound: reported as weight TB/s)
    fp8     FP8 GEMMs with per-row/per-channel scales (what `fp8` compute uses) against one scale per tensor
    skinny  a split-K Triton GEMM written for the text stream's few rows, against cuBLAS

    python benchmarks/gemm_shapes.py                 # CUDA only -> benchmarks/results/gemm_shapes.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from report import rerun_command, versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("image", "text", "fp8", "skinny")
# (in features, out features, GELU after it): q/k/v/out projections, MLP up (with GELU), MLP down.
SHAPES = {"qkv": (3072, 3072, False), "fc1": (3072, 12288, True), "fc2": (12288, 3072, False)}
COPIES = 6  # distinct weights per shape, more than L2 holds


def time_graph_ms(fn: Callable[[], Any], calls: int = 20, replays: int = 7) -> float:
    """Median milliseconds per `fn()` call, `calls` of them recorded in one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def cycling(make: Callable[[int], None]) -> Callable[[], None]:
    """A call that runs `make(i)` with i cycling over the weight copies."""
    state = {"i": 0}

    def call() -> None:
        state["i"] = (state["i"] + 1) % COPIES
        make(state["i"])

    return call


def weights(k: int, n: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return (
        [torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5 for _ in range(COPIES)],
        [torch.randn(n, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)],
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """The DiT's compiled linears: bias in the cuBLASLt epilogue, and GELU too after the MLP up-projection."""
    if gelu:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.linear(x, weight, bias)


def time_linears(
    fn: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    gelu: bool,
) -> float:
    """Milliseconds of `fn(x, weight, bias, gelu)` for every x of `inputs`, the weights cycling over their copies."""
    return time_graph_ms(cycling(lambda i: [fn(x, ws[i], bs[i], gelu) for x in inputs]))


def section_image(rows: list[dict[str, Any]], device: torch.device) -> None:
    for name, (k, n, gelu) in SHAPES.items():
        ws, bs = weights(k, n, device)
        x = torch.randn(8192, k, device=device, dtype=torch.bfloat16)
        for split, pieces in (("one GEMM", [x]), ("per sample", [x[:4096], x[4096:]])):
            ms = time_linears(linear, pieces, ws, bs, gelu)
            case = {"section": "image", "shape": name, "rows": 8192, "split": split}
            rows.append(
                {"impl": "cublas", "case": case, "ms": round(ms, 4), "tflops": round(2 * 8192 * k * n / ms / 1e9, 1)}
            )


def section_text(rows: list[dict[str, Any]], device: torch.device) -> None:
    for name, (k, n, gelu) in SHAPES.items():
        ws, bs = weights(k, n, device)
        for m in (6, 91, 97, 128, 182, 192, 224, 256):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ms = time_linears(linear, [x], ws, bs, gelu)
            case = {"section": "text", "shape": name, "rows": m}
            rows.append(
                {"impl": "cublas", "case": case, "ms": round(ms, 4), "weight_tb_per_s": round(2 * k * n / ms / 1e9, 2)}
            )
        parts = [
            torch.randn(91, k, device=device, dtype=torch.bfloat16),
            torch.randn(6, k, device=device, dtype=torch.bfloat16),
        ]
        ms = time_linears(linear, parts, ws, bs, gelu)
        rows.append(
            {"impl": "cublas", "case": {"section": "text", "shape": name, "rows": "91 + 6, apart"}, "ms": round(ms, 4)}
        )


def fp8_mm(
    x: torch.Tensor, weight: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return torch._scaled_mm(x, weight.t(), scale_a=scale_x, scale_b=scale_w, bias=bias, out_dtype=torch.bfloat16)


def section_fp8(rows: list[dict[str, Any]], device: torch.device) -> None:
    f8 = torch.float8_e4m3fn
    for name, (k, n, _) in SHAPES.items():
        wq = [(torch.randn(n, k, device=device) * k**-0.5 * 8).to(f8) for _ in range(COPIES)]
        bias = torch.randn(n, device=device, dtype=torch.bfloat16)
        for m in (4096, 8192):
            xq = torch.randn(m, k, device=device).to(f8)
            scalings = {
                "per row and channel": (torch.rand(m, 1, device=device) + 0.5, torch.rand(1, n, device=device) + 0.5),
                "per tensor": (torch.tensor(1.0, device=device), torch.tensor(1.0, device=device)),
            }
            for scaling, (sa, sb) in scalings.items():
                ms = time_linears(
                    lambda x, w, b, _, sa=sa, sb=sb: fp8_mm(x, w, sa, sb, b), [xq], wq, [bias] * COPIES, False
                )
                case = {"section": "fp8", "shape": name, "rows": m, "scaling": scaling}
                rows.append(
                    {"impl": "cublas", "case": case, "ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1)}
                )


def _skinny_configs() -> list[triton.Config]:
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": 128, "SPLIT": split}, num_stages=4 if bn == 64 else 3, num_warps=4)
        for bm in (64, 128)
        for bn in (64, 128)
        for split in (1, 2, 4)
    ]


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **_: Any) -> list[triton.Config]:
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    keep = []
    for config in configs:
        c = config.kwargs
        ctas = triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]) * c["SPLIT"]
        if k % (c["BK"] * c["SPLIT"]) == 0 and c["BM"] < 2 * max(m, 64) and 40 <= ctas <= 1200:
            keep.append(config)
    return keep


@triton.autotune(configs=_skinny_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _skinny_partial_kernel(
    x_ptr, w_ptr, part_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr
):
    # Tile (BM rows of x) x (BN rows of W) over one K-slice; partial sums in float32, one slab per slice.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    span = K // SPLIT
    k0 = tl.program_id(2) * span
    x = x_ptr + rm[:, None] * K + (k0 + rk)[None, :]
    w = w_ptr + rn[:, None] * K + (k0 + rk)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, span, BK):
        a = tl.load(x, mask=rm[:, None] < M, other=0.0)
        b = tl.load(w, mask=rn[:, None] < N, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        x += BK
        w += BK
    out = part_ptr + tl.program_id(2) * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _skinny_finish_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * M * N + offs, mask=live, other=0.0)
    acc += tl.load(bias_ptr + offs % N, mask=live, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=live)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """`x @ weight.T + bias` (GELU after it if asked) by the split-K Triton kernel: deterministic, no atomics."""
    m, k = x.shape
    n = weight.shape[0]
    chosen: dict[str, int] = {}

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        chosen["split"] = meta["SPLIT"]
        return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]), meta["SPLIT"]

    part = torch.empty((4, m, n), device=x.device, dtype=torch.float32)
    _skinny_partial_kernel[grid](x, weight, part, m, n, k)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _skinny_finish_kernel[(triton.cdiv(m * n, 1024),)](part, bias, out, m, n, chosen["split"], GELU=gelu, BLOCK=1024)
    return out


def section_skinny(rows: list[dict[str, Any]], device: torch.device) -> None:
    for name, (k, n, gelu) in SHAPES.items():
        ws, bs = weights(k, n, device)
        for m in (91, 128, 182, 192, 256):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            expected = linear(x.float(), ws[0].float(), bs[0].float(), False)
            expected = F.gelu(expected, approximate="tanh") if gelu else expected
            got = skinny_linear(x, ws[0], bs[0], gelu).float()
            err = ((got - expected).norm() / expected.norm()).item()
            for impl, fn in (("triton split-K", skinny_linear), ("cublas", linear)):
                ms = time_linears(fn, [x], ws, bs, gelu)
                values: dict[str, Any] = {"ms": round(ms, 4), "weight_tb_per_s": round(2 * k * n / ms / 1e9, 2)}
                if impl != "cublas":
                    values.update(rel_err=round(err, 5), config=str(_skinny_partial_kernel.best_config))
                rows.append({"impl": impl, "case": {"section": "skinny", "shape": name, "rows": m}, **values})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=RESULTS / "gemm_shapes.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_shapes.py measures CUDA kernels: no CUDA device here.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    sections = {"image": section_image, "text": section_text, "fp8": section_fp8, "skinny": section_skinny}
    for name in args.sections:
        sections[name](rows, device)
        print(f"{name}: {sum(r['case']['section'] == name for r in rows)} rows", flush=True)
    write_json(
        args.out,
        {
            "name": "gemm_shapes",
            "gpu": torch.cuda.get_device_name(device),
            "date": datetime.now(timezone.utc).date().isoformat(),
            "versions": versions("triton"),
            "command": rerun_command("benchmarks/gemm_shapes.py", sys.argv[1:] if argv is None else argv),
            "total_s": round(time.perf_counter() - started, 1),
            "rows": rows,
        },
    )
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
