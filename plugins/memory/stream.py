"""`stream`: block streaming under a VRAM budget, from pinned host memory with prefetch.

The budget (`vram_limit`, default: the free VRAM when applied) first pays for each component's non-block weights,
two fixed streaming buffers and, under a `vram_limit`, the DiT's estimated activations; blocks that fit stay
resident (spread evenly over the sequence), the others are copied into the streaming buffers just before they run,
the next one prefetched on a side CUDA stream while the current one computes. Batches run sample by sample, block by
block, so each streamed block is loaded once per step. Components stay on the device together while they fit the
budget and are evicted least-recently-used first when they do not. `vram_limit=0` is the minimum: only the
non-block weights and two blocks of the running component.
"""

from __future__ import annotations

from imagezoo.plugins.memory._placement import Placement


class Stream(Placement):
    """Block streaming under a VRAM budget; see `Placement` for the options."""

    name = "stream"
