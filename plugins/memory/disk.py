"""`disk`: weights read from the checkpoint's safetensors files when needed, never kept in host memory.

Like `stream`, with the files as the home instead of host memory: while a block is not on the device its parameters
are zero-storage placeholders, and loading it reads its tensors with `pread` (no memory maps, two small pinned
staging buffers on CUDA), so host RAM stays far below the model size and flat across steps and calls. Tensors that
are not in the files (non-persistent buffers) keep a small host copy. The weights in memory must equal the files when
it is applied (checked; a fused LoRA must be unfused first). Storage-dtype strategies (fp8) cannot be combined with
it: it re-reads the original weights every time.
"""

from __future__ import annotations

from imagezoo.plugins.memory._placement import Placement


class Disk(Placement):
    """Block streaming from the safetensors files; see `Placement` for the options."""

    name = "disk"
    source = "disk"
