"""Checkpoint files: atomic safetensors writes, and the resumable training state (no pickle anywhere).

Weights go to `output_path/step-N.safetensors` (or `epoch-E.safetensors`). The resumable state goes to
`output_path/training_state/step-N/`: trainable parameters in full precision, optimizer tensors (safetensors) and
structure (JSON), the LR scheduler, the step and data position, and each process's RNG states. Every file and the
state folder appear atomically (written under a temporary name, then renamed), so a crash or Ctrl-C during a save
leaves the previous checkpoint intact and never a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from imagezoo.errors import InputError, WeightsError

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
LATEST = "latest"
_STATE_FILE = "trainer.json"
_PARAMS_FILE = "trainable.safetensors"
_OPT_TENSORS = "optimizer.safetensors"
_OPT_JSON = "optimizer.json"
FORMAT_VERSION = 1


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # safetensors needs contiguous CPU tensors that share no storage with each other.
        data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(data, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def optimizer_to_files(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], structure: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict written by `optimizer_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in structure.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in structure["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA) RNG tensors, and Python/NumPy RNG states as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    extra = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], *_jsonable(list(np_state[1:]))]}
    return tensors, extra


def set_rng_state(tensors: Mapping[str, torch.Tensor], extra: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only for devices that exist)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    python = extra["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_training_state(
    folder: Path,
    *,
    params: Mapping[str, torch.Tensor] | None,
    optimizer_state: Mapping[str, Any] | None,
    trainer_state: Mapping[str, Any],
    rank: int,
    is_main: bool,
) -> None:
    """Write this process's part of a training state into `folder` (a temporary folder the caller renames)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_extra = rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(folder / f"rng_{rank}.safetensors"))
    (folder / f"rng_{rank}.json").write_text(json.dumps(rng_extra))
    if not is_main:
        return
    if params is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(folder / _PARAMS_FILE))
    if optimizer_state is not None:
        tensors, structure = optimizer_to_files(optimizer_state)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / _OPT_TENSORS))
        (folder / _OPT_JSON).write_text(json.dumps(structure))
    (folder / _STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **_jsonable(dict(trainer_state))}))


def publish_state(tmp: Path, final: Path, keep: int) -> None:
    """Rename a finished state folder into place, point `latest` at it, and prune older states beyond `keep`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(final.parent / LATEST, final.name + "\n")
    states = sorted(
        (p for p in final.parent.iterdir() if p.is_dir() and p.name.startswith("step-") and p != final),
        key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
    )
    for old in states[: max(0, len(states) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_state_folder(resume_from: str | Path, output_path: str | Path) -> Path:
    """The state folder for `--resume_from`: a state folder, an output folder (its latest state), or "latest".

    Raises:
        InputError: Nothing resumable is there.
    """
    candidates = []
    if str(resume_from) == LATEST:
        root = Path(output_path) / STATE_DIR
        candidates.append(root)
    else:
        path = Path(resume_from)
        candidates += [path, path / STATE_DIR]
    for candidate in candidates:
        if (candidate / _STATE_FILE).is_file():
            return candidate
        pointer = candidate / LATEST
        if pointer.is_file():
            target = candidate / pointer.read_text().strip()
            if (target / _STATE_FILE).is_file():
                return target
    raise InputError(
        f"--resume_from {str(resume_from)!r}: no training state found (looked for {_STATE_FILE} or a "
        f"'{LATEST}' pointer in {', '.join(str(c) for c in candidates)}). Point it at an output_path of an earlier run "
        f"or at one of its {STATE_DIR}/step-N folders."
    )


def read_training_state(folder: Path, rank: int) -> dict[str, Any]:
    """Load a state written by `write_training_state` (RNG of this rank, or of rank 0 if this rank has none)."""
    try:
        trainer = json.loads((folder / _STATE_FILE).read_text())
        out: dict[str, Any] = {"trainer": trainer}
        if (folder / _PARAMS_FILE).is_file():
            out["params"] = load_file(str(folder / _PARAMS_FILE))
        if (folder / _OPT_TENSORS).is_file():
            out["optimizer"] = optimizer_from_files(
                load_file(str(folder / _OPT_TENSORS)), json.loads((folder / _OPT_JSON).read_text())
            )
        rng_rank = rank if (folder / f"rng_{rank}.safetensors").is_file() else 0
        if (folder / f"rng_{rng_rank}.safetensors").is_file():
            out["rng"] = (
                load_file(str(folder / f"rng_{rng_rank}.safetensors")),
                json.loads((folder / f"rng_{rng_rank}.json").read_text()),
            )
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise WeightsError(f"Training state {folder} is unreadable or incomplete: {exc}") from None
    if trainer.get("format") != FORMAT_VERSION:
        raise WeightsError(f"Training state {folder} has format {trainer.get('format')!r}; expected {FORMAT_VERSION}.")
    return out
