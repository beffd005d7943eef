"""What the DiT keeps for the length of one sampling loop (`QwenImageDiT.sampling`): modulation tables, CUDA graphs.

A sampling loop tells the DiT its sigmas before the first step, and promises that the model does not change until it
ends. Two things then pay:

- Modulation tables. Each block's two modulation linears (3,072 -> 18,432) depend on sigma only. A forward computes
  them for its one sigma: a GEMV that reads every modulation weight (13.6 GB in the 20B model), 5 ms a step on an
  H100. At the first step each block computes them for every sigma of the loop in one GEMM, and later steps take
  their row. Same maths; the rows differ from a lone GEMV's by float rounding only (another kernel's summation order).
- CUDA graphs (the `cuda_graph` speed option): the second forward with a given input layout is captured into a CUDA
  graph and later ones replay it, so the GPU runs a step's ~2,000 kernels back to back without waiting on Python.
  The first forward of a layout runs normally: it compiles, plans attention and reads the mask's facts, none of which
  may happen during a capture. The second runs normally too, and the capture is recorded while the GPU computes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass
class ModulationTables:
    """Every block's modulation outputs for every sigma of a sampling loop, filled block by block on first use.

    Sigmas are matched as the forward receives them, rounded to their tensor's dtype (a bf16 sigma tensor holds
    bf16 values), and the table is computed from the same rounded values.

    Args:
        sigmas: The loop's noise levels, in step order.
    """

    sigmas: tuple[float, ...]
    _rows: dict[torch.dtype, dict[float, int]] = field(default_factory=dict)
    _temb_act: dict[torch.dtype, Tensor] = field(default_factory=dict)
    _tables: dict[tuple[torch.dtype, int], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def row(self, sigma: Tensor) -> int | None:
        """The table row of `sigma` (B,) when all samples share one scheduled value, else None (compute as usual).

        Reads `sigma` on the host: free for a CPU tensor (as the pipeline passes it); a GPU tensor costs a wait for
        the queued kernels.
        """
        rows = self._rows.get(sigma.dtype)
        if rows is None:
            rows = self._rows[sigma.dtype] = {}
            for index, value in enumerate(torch.tensor(self.sigmas, dtype=sigma.dtype).tolist()):
                rows.setdefault(value, index)  # steps whose sigmas round alike share the first one's row
        values = set(sigma.tolist())
        return rows.get(values.pop()) if len(values) == 1 else None

    def block_rows(
        self,
        index: int,
        block: nn.Module,
        row: Tensor,
        sigma_dtype: torch.dtype,
        temb_act: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Block `index`'s (image, text) modulation outputs at `row`, each (1, 6 * width).

        Args:
            index: Block position.
            block: The block: its `img_mod[1]` and `txt_mod[1]` linears fill its table on first use.
            row: (1,) index tensor on the device, from `row`.
            sigma_dtype: Dtype of the forward's sigma tensor.
            temb_act: The DiT's SiLU(timestep embedding) of a (S,) sigma tensor.
        """
        tables = self._tables.get((sigma_dtype, index))
        if tables is None:
            act = self._temb_act.get(sigma_dtype)
            if act is None:
                sigmas = torch.tensor(self.sigmas, dtype=sigma_dtype).to(row.device)
                act = self._temb_act[sigma_dtype] = temb_act(sigmas)
            tables = self._tables[(sigma_dtype, index)] = (block.img_mod[1](act), block.txt_mod[1](act))
        return tables[0].index_select(0, row), tables[1].index_select(0, row)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


class ForwardGraphs:
    """Captures a forward into a CUDA graph at the second call with one input layout, and replays it from the third."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self.captures = 0
        self.replays = 0
        self.record_s = 0.0  # host seconds spent recording graphs

    def __call__(self, key: tuple[Any, ...], run: Callable[..., Tensor], inputs: Sequence[Tensor]) -> Tensor:
        """`run(*inputs)`, from a graph when this layout was seen before.

        Args:
            key: What else decides which kernels `run` launches (e.g. a mask's lengths); the tensors' shapes,
                dtypes, strides and devices are added here.
            run: The forward. Once it has run for a layout, it must not read the GPU on the host for that layout.
            inputs: The tensors that change between calls; a replay copies them into the graph's own.
        """
        key = (*key, *((tuple(t.shape), t.dtype, t.stride(), t.device) for t in inputs))
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:  # warm-up: compiles, attention plans, host reads happen now, uncaptured
                self._seen.add(key)
                return run(*inputs)
            # The second call runs normally, and the graph is recorded while the GPU computes it: recording launches
            # nothing, so captured first, the GPU would idle through the host's whole pass (160 ms of a 1024² CFG
            # step on an H100).
            output = run(*inputs)
            self._graphs[key] = self._capture(run, inputs)
            return output
        for static, value in zip(captured.inputs, inputs, strict=True):
            static.copy_(value)
        captured.graph.replay()
        self.replays += 1
        return captured.output.clone()  # the next replay overwrites the graph's output

    def _capture(self, run: Callable[..., Tensor], inputs: Sequence[Tensor]) -> _Captured:
        """Record `run` on a side stream, without `torch.cuda.graph`'s device-wide sync, so the queued work goes on.

        The recording depends on nothing queued: it reads only its own input copies, whose values are set before
        each replay on the stream that replays it.
        """
        start = time.perf_counter()
        static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream(static[0].device)):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                output = run(*static)
            finally:
                graph.capture_end()
        self.captures += 1
        seconds = time.perf_counter() - start
        self.record_s += seconds
        logger.debug("Recorded a CUDA graph of the DiT forward in %.3f s (%d so far)", seconds, self.captures)
        return _Captured(graph, static, output)


@dataclass
class SamplingScope:
    """What `QwenImageDiT.sampling` holds while its loop runs."""

    tables: ModulationTables
    graphs: ForwardGraphs | None = None
