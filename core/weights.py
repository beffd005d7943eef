"""Weight files: resolving paths, downloading (modelscope / Hugging Face Hub) and reading safetensors.

Only safetensors is ever read. Pickle checkpoints (`.bin`, `.pt`, `.ckpt`) can run arbitrary code when loaded,
so they are refused with a note on how to convert them.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from imagezoo.config import ModelConfig
from imagezoo.errors import ImagezooError, InputError, WeightsError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# safetensors itself rejects headers above 100 MB; a bigger length field means the file is garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_GLOB_CHARS = "*?["
_REDOWNLOAD = "Delete it and download it again."

Header = dict[str, tuple[str, tuple[int, ...]]]


# --------------------------------------------------------------------------------------------------------------------
# Reading safetensors headers (json only, no tensor data)
# --------------------------------------------------------------------------------------------------------------------


def _corrupt(path: Path, reason: str) -> WeightsError:
    return WeightsError(
        f"{path} is not a readable safetensors file ({reason}); it is corrupt or only partly downloaded. {_REDOWNLOAD}"
    )


def _read_raw_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Return (header length in bytes, parsed json header) of a safetensors file."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is only {len(prefix)} bytes long")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length field says {length:,} bytes")
            raw = f.read(length)
    except OSError as e:
        raise WeightsError(f"Cannot read weights file {path}: {e}. Check that it exists and is readable.") from e
    if len(raw) < length:
        raise _corrupt(path, f"header needs {length:,} bytes but the file ends after {len(raw):,}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return length, header


def _is_uint_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and x >= 0 for x in value)


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return _is_uint_list(shape) and _is_uint_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def _read_entries(path: Path) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """Return (header length, tensor entries, metadata), checking each entry's structure."""
    length, header = _read_raw_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise _corrupt(path, f"entry for tensor {name!r} is malformed: {entry!r}")
    return length, header, metadata


def read_safetensors_header(path: str | Path) -> Header:
    """Read tensor names, dtypes and shapes from a safetensors header without loading any data.

    Args:
        path: A `.safetensors` file.

    Returns:
        Tensor name -> (dtype string such as `"BF16"`, shape).
    """
    _, entries, _ = _read_entries(Path(path))
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in entries.items()}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Read the free-form `__metadata__` string map of a safetensors file (empty if it has none)."""
    return _read_entries(Path(path))[2]


def read_shapes(files: Sequence[str | Path]) -> dict[str, tuple[int, ...]]:
    """Union of the tensor shapes in the files' headers, for architecture inference without loading data.

    Args:
        files: `.safetensors` files, or folders of them.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _expand_folders(files):
        shapes.update({name: shape for name, (_, shape) in read_safetensors_header(path).items()})
    return shapes


def find_config_json(files: Sequence[str | Path]) -> dict[str, Any] | None:
    """Parse the `config.json` beside the first file (or inside it, if it is a folder), if there is one.

    Architecture sizes come from it when present; otherwise callers infer them from `read_shapes`.
    """
    if not files:
        return None
    first = Path(files[0])
    config_path = (first if first.is_dir() else first.parent) / "config.json"
    if not config_path.is_file():
        return None
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_path} is not valid JSON ({e}). {_REDOWNLOAD}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{config_path} holds a {type(data).__name__}, not a JSON object. {_REDOWNLOAD}")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Resolving paths
# --------------------------------------------------------------------------------------------------------------------


def _pickle_refused(path: Path) -> WeightsError:
    target = path.with_suffix(SAFETENSORS_SUFFIX)
    return WeightsError(
        f"{path} is a pickle-format checkpoint ({path.suffix}); imagezoo refuses pickle formats "
        f"({', '.join(sorted(PICKLE_SUFFIXES))}) because loading them can run arbitrary code. "
        "Download the .safetensors version of the model, or convert this file once with: "
        f'python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{path}', weights_only=True), '{target}')\" "
        "(if the file holds a nested dict such as {'state_dict': ...}, save that inner dict)."
    )


def _check_suffix(path: Path) -> None:
    """Refuse anything that is not a .safetensors file by name, pickle formats with a conversion hint."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refused(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise WeightsError(
            f"{path} is not a .safetensors file; imagezoo reads safetensors only. "
            "Give a .safetensors file, a list of shard files, or a folder that contains them."
        )


def _files_in_folder(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refused(pickles[0])
    raise WeightsError(
        f"Folder {folder} contains no .safetensors files. Point to the folder that holds the weights "
        "(e.g. the `transformer/` subfolder of a diffusers repo), or download them first."
    )


def _read_index(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a `*.safetensors.index.json`."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise WeightsError(f"Shard index {index} is unreadable ({e}). {_REDOWNLOAD}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"Shard index {index} has no valid 'weight_map' object. {_REDOWNLOAD}")
    return weight_map


def _index_shards(index: Path) -> list[Path]:
    return [index.parent / name for name in sorted(set(_read_index(index).values()))]


def _resolve_one(path: Path) -> list[Path]:
    path = path.expanduser()
    if not path.exists():
        raise WeightsError(f"Weights path {path} does not exist (relative paths start at {Path.cwd()}). Check it.")
    if path.is_dir():
        return _files_in_folder(path)
    if path.name.endswith(INDEX_SUFFIX):
        # An index file stands for the shards it lists.
        return _index_shards(path)
    _check_suffix(path)
    return [path]


def _relevant_indexes(files: Iterable[Path], errors: dict[Path, list[str]] | None = None) -> dict[Path, dict[str, str]]:
    """Index files beside `files` that list at least one of them, with their weight maps.

    A folder may hold several indexes (e.g. a repo root with two components); only those naming one of the
    given files apply to them. An unreadable index raises, or is recorded in `errors` when that is given.
    """
    names_by_folder: dict[Path, set[str]] = {}
    for f in files:
        names_by_folder.setdefault(f.parent, set()).add(f.name)
    indexes = {}
    for folder, names in names_by_folder.items():
        for index in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
            try:
                weight_map = _read_index(index)
            except WeightsError as e:
                if errors is None:
                    raise
                errors[index] = [str(e)]
                continue
            if names & set(weight_map.values()):
                indexes[index] = weight_map
    return indexes


def files_from_path(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve `ModelConfig.path` to a list of `.safetensors` files.

    Args:
        path: One file, a list of shard files, a folder (all `*.safetensors` in it, sorted), or a
            `*.safetensors.index.json` (the shards it lists).

    Raises:
        WeightsError: A path is missing, is not safetensors (pickle formats are refused), a folder has no
            safetensors files, or a shard named by an index beside the files is missing.
    """
    if isinstance(path, (str, Path)):
        files = _resolve_one(Path(path))
    else:
        if not path:
            raise WeightsError("The weights path list is empty; give at least one .safetensors file or a folder.")
        files = [f for p in path for f in _resolve_one(Path(p))]
    repeated = sorted(str(f) for f, n in Counter(files).items() if n > 1)
    if repeated:
        raise WeightsError(f"Weights file(s) given more than once: {', '.join(repeated)}. List each file once.")
    for index, weight_map in _relevant_indexes(files).items():
        for shard in sorted(set(weight_map.values())):
            if not (index.parent / shard).is_file():
                raise WeightsError(
                    f"Shard {index.parent / shard} is missing: the index {index} lists it. "
                    "Download the missing file (or delete the folder and download it again)."
                )
    return files


def _expand_folders(files: Sequence[str | Path]) -> list[Path]:
    """Replace folders (from folder patterns like `"transformer/"`) by the safetensors files inside them."""
    out: list[Path] = []
    for f in map(Path, files):
        out.extend(_files_in_folder(f) if f.is_dir() else [f])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Verifying completeness
# --------------------------------------------------------------------------------------------------------------------


def _size_problem(path: Path) -> str | None:
    """Compare the file size to what the header promises; raises WeightsError if the header is unreadable."""
    length, entries, _ = _read_entries(path)
    expected = 8 + length + max((e["data_offsets"][1] for e in entries.values()), default=0)
    actual = path.stat().st_size
    if actual < expected:
        return f"{path} is truncated: {actual:,} bytes, its header says {expected:,} (partly downloaded?)"
    if actual > expected:
        return f"{path} has {actual - expected:,} bytes more than its header describes (corrupt)"
    return None


def _file_problems(path: Path) -> list[str]:
    if not path.exists():
        return [f"{path} is missing"]
    if path.suffix != SAFETENSORS_SUFFIX:
        return []  # tokenizer/config files: existence is all that can be checked
    try:
        problem = _size_problem(path)
    except WeightsError as e:
        return [str(e)]
    return [problem] if problem else []


def _index_tensor_problems(index: Path, weight_map: dict[str, str]) -> dict[Path, str]:
    """Shards present on disk whose header lacks tensors the index maps to them."""
    expected: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        expected.setdefault(shard, set()).add(tensor)
    problems: dict[Path, str] = {}
    for shard_name, tensors in sorted(expected.items()):
        shard = index.parent / shard_name
        try:
            absent = sorted(tensors - set(read_safetensors_header(shard)))
        except WeightsError:
            continue  # missing or unreadable: reported by the per-file check
        if absent:
            problems[shard] = (
                f"{shard} lacks {len(absent)} tensor(s) that {index.name} maps to it, e.g. {absent[0]!r} "
                "(files from different versions of the model?)"
            )
    return problems


def _problems_by_file(files: Sequence[str | Path]) -> dict[Path, list[str]]:
    """Every problem found, keyed by the file to blame (which may not exist)."""
    paths: list[Path] = []
    for f in map(Path, files):
        paths.extend(sorted(f.glob(f"*{SAFETENSORS_SUFFIX}")) if f.is_dir() else [f])
    problems: dict[Path, list[str]] = {}
    indexes = _relevant_indexes(paths, errors=problems)
    for index, weight_map in indexes.items():
        # Shards the index names but the caller did not list must be there and sound too.
        paths.extend(index.parent / name for name in sorted(set(weight_map.values())))
    for path in dict.fromkeys(paths):
        found = _file_problems(path)
        if found:
            problems[path] = found
    for index, weight_map in indexes.items():
        for path, problem in _index_tensor_problems(index, weight_map).items():
            problems.setdefault(path, []).append(problem)
    return problems


def verify_files(files: Sequence[str | Path]) -> list[str]:
    """Check weight files for completeness without loading tensor data.

    Finds: missing files; safetensors files whose size is not `8 + header length + data end` (truncated or
    partly downloaded); unreadable headers; and, when a `*.safetensors.index.json` sits beside shards, shards
    it names that are missing or lack tensors it maps to them. Folders are checked file by file.

    Returns:
        One message per problem; empty if all is fine.
    """
    return [p for found in _problems_by_file(files).values() for p in found]


# --------------------------------------------------------------------------------------------------------------------
# Local model folders and downloading
# --------------------------------------------------------------------------------------------------------------------


def _model_id(config: ModelConfig) -> str:
    if not config.model_id:
        raise InputError(f"ModelConfig({config.describe()}) has no model_id; downloads need model_id=... .")
    return config.model_id


def local_dir_of(config: ModelConfig) -> Path:
    """The folder a model's files live in: `<local_model_path>/<model_id>`."""
    return Path(config.local_model_path or ".").expanduser() / _model_id(config)


def _is_folder_pattern(pattern: str | None) -> bool:
    # No pattern means the whole repo, i.e. the model folder itself.
    return not pattern or pattern.endswith("/")


def _local_matches(config: ModelConfig) -> list[Path]:
    """Files matching `origin_file_pattern` in the local model folder, or `[folder]` for a folder pattern."""
    local_dir, pattern = local_dir_of(config), config.origin_file_pattern
    if _is_folder_pattern(pattern):
        folder = local_dir / pattern.strip("/") if pattern else local_dir
        return [folder] if folder.is_dir() and any(folder.iterdir()) else []
    return sorted(p for p in local_dir.glob(pattern) if p.is_file())


def find_complete_local_files(config: ModelConfig) -> list[Path] | None:
    """Return the local files matching `config.origin_file_pattern` if all are there and complete, else None.

    A pattern ending in `/` means that folder: `[folder]` if it exists and is not empty.
    """
    matches = _local_matches(config)
    if not matches:
        return None
    problems = verify_files(matches)
    if problems:
        logger.info("Local files of %s are incomplete: %s", config.model_id, "; ".join(problems))
        return None
    return matches


def _allow_patterns(pattern: str | None) -> list[str] | None:
    """Download patterns for an origin pattern: the pattern, its shard index and the folder's config.json."""
    if _is_folder_pattern(pattern):
        # Hub patterns are fnmatch globs, where "tokenizer/" matches nothing; "tokenizer/*" matches the folder.
        return [pattern.rstrip("/") + "/*"] if pattern and pattern.strip("/") else None
    patterns = [pattern]
    if pattern.endswith(SAFETENSORS_SUFFIX):
        if any(c in pattern for c in _GLOB_CHARS):
            patterns.append(pattern + ".index.json")  # "model*.safetensors" -> "model*.safetensors.index.json"
        folder = pattern.rpartition("/")[0]
        patterns.append(f"{folder}/config.json" if folder else "config.json")  # architecture sizes
    return patterns


def _default_snapshot_download(
    model_id: str, *, local_dir: Path, allow_patterns: list[str] | None, source: str = "modelscope"
) -> None:
    """Download the files of `model_id` matching `allow_patterns` into `local_dir`; the hubs show progress bars."""
    if source == "huggingface":
        try:
            from huggingface_hub import snapshot_download as hf_snapshot_download
        except ImportError as e:
            raise WeightsError(
                "source='huggingface' needs the huggingface_hub package: `pip install huggingface_hub`, "
                "or use source='modelscope'."
            ) from e
        hf_snapshot_download(repo_id=model_id, local_dir=str(local_dir), allow_patterns=allow_patterns)
        return
    try:
        import modelscope  # lazily: importing it takes about a second
    except ImportError as e:
        raise WeightsError("Downloading from modelscope needs the modelscope package: `pip install modelscope`.") from e
    # modelscope 1.40: `allow_patterns` (fnmatch globs) wins over the older alias `allow_file_pattern`.
    modelscope.snapshot_download(model_id, local_dir=str(local_dir), allow_patterns=allow_patterns)


# Tests and callers with their own transport replace this; the rest of the download path stays the same.
snapshot_download_fn: Callable[..., None] = _default_snapshot_download


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _delete_incomplete(config: ModelConfig) -> None:
    """Delete local files that fail verification so the hub fetches them again instead of skipping them."""
    local_dir = local_dir_of(config)
    for path, problems in _problems_by_file(_local_matches(config)).items():
        # An index could name "../x"; never delete outside the model folder.
        if path.is_file() and _is_inside(path, local_dir):
            logger.warning("%s; deleting it so it is fetched again.", "; ".join(problems))
            path.unlink()


def _missing_message(config: ModelConfig) -> str:
    matches = _local_matches(config)
    problems = verify_files(matches) if matches else []
    if problems:
        return "files are incomplete: " + "; ".join(problems)
    return f"no file matches origin_file_pattern={config.origin_file_pattern!r}"


def download_model_files(config: ModelConfig) -> list[Path]:
    """Return complete local files for `config`, downloading those missing or incomplete.

    Files already present and complete are used as they are. Incomplete ones are deleted and fetched again.

    Raises:
        WeightsError: `skip_download=True` and the files are not all there, the download failed, or the
            files are still incomplete after it.
    """
    model_id, pattern, local_dir = _model_id(config), config.origin_file_pattern, local_dir_of(config)
    files = find_complete_local_files(config)
    if files is not None:
        logger.info("Using %d local file(s) of %s (pattern %r) in %s.", len(files), model_id, pattern, local_dir)
        return files
    if config.skip_download:
        raise WeightsError(
            f"skip_download=True but the weights of {model_id!r} are not all in {local_dir}: "
            f"{_missing_message(config)}. Run `imagezoo download {model_id}` or set skip_download=False."
        )
    _delete_incomplete(config)
    patterns = _allow_patterns(pattern)
    logger.info("Downloading %s (patterns %s) from %s into %s.", model_id, patterns, config.source, local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download_fn(model_id, local_dir=local_dir, allow_patterns=patterns, source=config.source)
    except ImagezooError:
        raise
    except Exception as e:  # hub clients raise many unrelated types; all mean "download failed"
        raise WeightsError(
            f"Downloading {model_id!r} (patterns {patterns}) from {config.source} into {local_dir} failed: {e}. "
            "Check the model ID, the pattern and your network, or put the files there and set skip_download=True."
        ) from e
    files = find_complete_local_files(config)
    if files is None:
        raise WeightsError(
            f"After downloading {model_id!r} from {config.source} into {local_dir}, {_missing_message(config)}. "
            "Check origin_file_pattern against the repo's file list, then delete the folder and try again."
        )
    return files


# --------------------------------------------------------------------------------------------------------------------
# Loading tensors
# --------------------------------------------------------------------------------------------------------------------


def _check_loadable(path: Path) -> set[str]:
    """Refuse non-safetensors and incomplete files before any data is read; return the tensor names."""
    _check_suffix(path)
    problem = _size_problem(path)
    if problem:
        raise WeightsError(f"{problem}. {_REDOWNLOAD}")
    return set(read_safetensors_header(path))


def _read_tensors(path: Path, device: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    except SafetensorError as e:
        raise _corrupt(path, str(e)) from e
    return tensors


def load_safetensors(
    files: Sequence[str | Path], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Load all tensors of safetensors files (shards) into one dict.

    Args:
        files: `.safetensors` files, or folders of them.
        device: Device the tensors are created on.
        dtype: If given, floating-point tensors are cast to it; integer tensors are kept as they are.

    Raises:
        WeightsError: A file is not safetensors, corrupt or truncated (naming it), or a tensor name appears in
            two files (naming both).
    """
    paths = _expand_folders(files)
    owner: dict[str, Path] = {}
    for path in paths:  # headers first: fail before reading gigabytes of data
        for name in _check_loadable(path):
            if name in owner:
                raise WeightsError(
                    f"Tensor {name!r} is in both {owner[name]} and {path}; these files are not shards of one "
                    "checkpoint. Pass only the shards of one model version."
                )
            owner[name] = path
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(_read_tensors(path, str(device), dtype))
    return state
