"""`imagezoo inspect`: describe a safetensors checkpoint from its headers alone (no tensor data is read)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from imagezoo.plugin_manager import Kernel, get_kernel
from imagezoo.weights import files_from_path, find_config_json, read_safetensors_header


def inspect_checkpoint(path: str | Path, kernel: Kernel | None = None) -> dict[str, Any]:
    """Report what a checkpoint is and whether it loads into a registered architecture.

    Returns a dict with the file list, tensor and parameter counts, dtypes, the detected family/component/key
    format, and the keys that do not match (missing, unexpected, wrong shape) the architecture inferred from the
    checkpoint's config.json or shapes.
    """
    kernel = kernel or get_kernel()
    files = files_from_path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: Counter[str] = Counter()
    for file in files:
        for name, (dtype, shape) in read_safetensors_header(file).items():
            shapes[name] = shape
            dtypes[dtype] += 1
    report: dict[str, Any] = {
        "path": str(path),
        "files": len(files),
        "tensors": len(shapes),
        "parameters": sum(math.prod(shape) for shape in shapes.values()),
        "dtypes": dict(dtypes),
        "family": None,
        "component": None,
        "matches_architecture": False,
    }
    for registered in kernel.families:
        family = registered.value
        component = family.detect_component(list(shapes))
        if component is None:
            continue
        report.update(family=registered.name, component=component)
        report.update(family.describe_checkpoint(component, shapes, find_config_json(files)))
        break
    return report
