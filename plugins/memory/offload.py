"""`offload`: component offload. Components live in host memory and take turns on the compute device.

Before a component runs (text encoder, then the DiT for every step, then the VAE) it is copied to the device whole
and the previously active one is dropped from it, so peak VRAM is the largest component plus activations (those of
one sample: batches run sample by sample). With `vram_limit`, a component larger than the limit (with its estimated
activations) also streams the blocks that do not fit (see `stream`).
"""

from __future__ import annotations

from imagezoo.plugins.memory._placement import Placement


class Offload(Placement):
    """Component offload (components in turn); `vram_limit=None` keeps each active component whole on the device.

    Options are those of `Placement` (`components`, `vram_limit`, `vram_buffer`, `num_persistent_param_in_dit`,
    `prefetch`, `sources`).
    """

    name = "offload"
    exclusive_default = True
    default_budget_is_free_vram = False
