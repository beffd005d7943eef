"""What every benchmark records beside its figures: software versions and the results JSON file.

Imported by the scripts in this folder (run as `python benchmarks/<name>.py`, which puts this folder on `sys.path`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def versions(*packages: str) -> dict[str, str | None]:
    """Python, torch, CUDA and cuDNN versions plus each named package's.

    A package imported from a source tree (no installed metadata) reports its `__version__`; one that cannot be
    imported reports None.
    """
    info: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
    }
    for package in packages:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            try:
                info[package] = str(importlib.import_module(package).__version__)
            except (ImportError, AttributeError):
                info[package] = None
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a results file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def rerun_command(script: str, argv: Sequence[str]) -> str:
    """`python <script> <argv>` minus `--out PATH`: where a run wrote its JSON is not part of what it measured."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return shlex.join(["python", script, *kept])
