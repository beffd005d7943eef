"""Tests of imagezoo.weights: path resolution, completeness checks, downloading, safetensors reading."""

from __future__ import annotations

import fnmatch
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from imagezoo import weights
from imagezoo.config import ModelConfig
from imagezoo.errors import WeightsError

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
PATTERN = "transformer/model*.safetensors"
MODEL_ID = "org/tiny-model"


def _write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / INDEX
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    """Tensors of two shards, by shard file name."""
    gen = torch.Generator().manual_seed(0)
    return {
        SHARD1: {"a.weight": torch.randn(4, 3, generator=gen)},
        SHARD2: {"b.weight": torch.randn(2, generator=gen), "b.index": torch.arange(3)},
    }


@pytest.fixture
def shard_dir(tmp_path: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A folder with two shards, their index and a config.json, like a diffusers component folder."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, content in tensors.items():
        save_file(content, folder / name)
    _write_index(folder, {key: name for name, content in tensors.items() for key in content})
    (folder / "config.json").write_text(json.dumps({"num_layers": 2}))
    return folder


@pytest.fixture
def remote(tmp_path: Path, shard_dir: Path) -> Path:
    """The 'hub' side of a model repo: transformer shards + index + config, and a tokenizer folder."""
    repo = tmp_path / "remote"
    shutil.copytree(shard_dir, repo / "transformer")
    (repo / "tokenizer").mkdir()
    (repo / "tokenizer" / "vocab.json").write_text("{}")
    return repo


class FakeHub:
    """Stands in for `snapshot_download_fn`: records calls and copies matching repo files into local_dir."""

    def __init__(self, repo: Path, truncate_by: int = 0) -> None:
        self.repo, self.truncate_by, self.calls = repo, truncate_by, []

    def __call__(self, model_id: str, *, local_dir: Path, allow_patterns: list[str] | None, source: str) -> None:
        self.calls.append({"model_id": model_id, "local_dir": local_dir, "allow_patterns": allow_patterns})
        for src in self.repo.rglob("*"):
            rel = src.relative_to(self.repo).as_posix()
            if src.is_dir() or not any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                continue
            dst = local_dir / rel
            if dst.exists():  # like the hubs: files already there are skipped
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            dst.write_bytes(data[: len(data) - self.truncate_by] if src.suffix == ".safetensors" else data)


@pytest.fixture
def config(tmp_path: Path) -> ModelConfig:
    return ModelConfig(model_id=MODEL_ID, origin_file_pattern=PATTERN, local_model_path=tmp_path / "models")


def _truncate(path: Path, nbytes: int = 5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


# ---- files_from_path -------------------------------------------------------------------------------------------------


def test_files_from_path_file_list_and_folder(shard_dir: Path) -> None:
    one = shard_dir / SHARD1
    assert weights.files_from_path(one) == [one]
    assert weights.files_from_path(str(one)) == [one]
    assert weights.files_from_path([shard_dir / SHARD2, one]) == [shard_dir / SHARD2, one]
    assert weights.files_from_path(shard_dir) == [shard_dir / SHARD1, shard_dir / SHARD2]
    assert weights.files_from_path(shard_dir / INDEX) == [shard_dir / SHARD1, shard_dir / SHARD2]


def test_files_from_path_missing_shard_named(shard_dir: Path) -> None:
    (shard_dir / SHARD2).unlink()
    with pytest.raises(WeightsError, match=SHARD2):
        weights.files_from_path(shard_dir)
    with pytest.raises(WeightsError, match=SHARD2):
        weights.files_from_path([shard_dir / SHARD1])


def test_files_from_path_refuses_pickle(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(1)}, ckpt)
    with pytest.raises(WeightsError, match="pickle") as err:
        weights.files_from_path(ckpt)
    assert str(ckpt) in str(err.value) and "save_file" in str(err.value)
    with pytest.raises(WeightsError, match=r"model\.bin.*pickle"):
        weights.files_from_path(tmp_path)  # folder holding only a pickle checkpoint


@pytest.mark.parametrize("name", ["missing.safetensors", "empty_dir", "notes.txt"])
def test_files_from_path_bad_paths_named(tmp_path: Path, name: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match=name):
        weights.files_from_path(tmp_path / name)


def test_files_from_path_empty_list_and_repeats(shard_dir: Path) -> None:
    with pytest.raises(WeightsError, match="empty"):
        weights.files_from_path([])
    with pytest.raises(WeightsError, match="more than once"):
        weights.files_from_path([shard_dir / SHARD1, shard_dir / SHARD1])


# ---- verify_files ----------------------------------------------------------------------------------------------------


def test_verify_files_ok_and_truncated(shard_dir: Path) -> None:
    files = [shard_dir / SHARD1, shard_dir / SHARD2]
    assert weights.verify_files(files) == []
    _truncate(shard_dir / SHARD2)
    problems = weights.verify_files(files)
    assert len(problems) == 1 and SHARD2 in problems[0] and "truncated" in problems[0]


def test_verify_files_index_problems(shard_dir: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {key: name for name, content in tensors.items() for key in content}
    _write_index(shard_dir, {**weight_map, "c.weight": SHARD1, "d.weight": "model-00003-of-00002.safetensors"})
    problems = weights.verify_files([shard_dir / SHARD1, shard_dir / SHARD2])
    assert any(SHARD1 in p and "c.weight" in p for p in problems)
    assert any("model-00003-of-00002.safetensors" in p and "missing" in p for p in problems)
    assert len(problems) == 2


def test_verify_files_garbage_and_extra_bytes(shard_dir: Path) -> None:
    (shard_dir / SHARD1).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with (shard_dir / SHARD2).open("ab") as f:
        f.write(b"extra")
    problems = weights.verify_files([shard_dir / SHARD1, shard_dir / SHARD2])
    assert any(SHARD1 in p and "JSON" in p for p in problems)
    assert any(SHARD2 in p and "more than its header" in p for p in problems)


# ---- download path ---------------------------------------------------------------------------------------------------


def test_download_then_found_locally(
    monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig, tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    hub = FakeHub(remote)
    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    local = Path(config.local_model_path) / MODEL_ID
    assert weights.find_complete_local_files(config) is None

    files = weights.download_model_files(config)
    assert files == [local / "transformer" / SHARD1, local / "transformer" / SHARD2]
    assert hub.calls == [
        {
            "model_id": MODEL_ID,
            "local_dir": local,
            "allow_patterns": [PATTERN, PATTERN + ".index.json", "transformer/config.json"],
        }
    ]
    assert (local / "transformer" / INDEX).is_file()
    assert weights.find_config_json(files) == {"num_layers": 2}

    assert weights.find_complete_local_files(config) == files
    assert weights.download_model_files(config) == files
    assert len(hub.calls) == 1  # second call used the complete local files
    loaded = weights.load_safetensors(files)
    assert torch.equal(loaded["a.weight"], tensors[SHARD1]["a.weight"])


def test_truncated_shard_is_fetched_again(
    monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig, tensors: dict[str, dict[str, torch.Tensor]]
) -> None:
    hub = FakeHub(remote)
    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    files = weights.download_model_files(config)
    _truncate(files[1], 7)
    assert any(SHARD2 in p for p in weights.verify_files(files))
    assert weights.find_complete_local_files(config) is None

    assert weights.download_model_files(config) == files
    assert len(hub.calls) == 2
    loaded = weights.load_safetensors(files)
    expected = {**tensors[SHARD1], **tensors[SHARD2]}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_missing_shard_is_fetched(monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig) -> None:
    hub = FakeHub(remote)
    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    files = weights.download_model_files(config)
    files[0].unlink()  # the glob still matches shard 2; the index says shard 1 is missing
    assert weights.find_complete_local_files(config) is None
    assert weights.download_model_files(config) == files
    assert len(hub.calls) == 2


def test_skip_download_missing_names_folder(monkeypatch: pytest.MonkeyPatch, remote: Path, tmp_path: Path) -> None:
    hub = FakeHub(remote)
    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    cfg = ModelConfig(model_id=MODEL_ID, origin_file_pattern=PATTERN, local_model_path=tmp_path, skip_download=True)
    with pytest.raises(WeightsError) as err:
        weights.download_model_files(cfg)
    message = str(err.value)
    assert str(tmp_path / MODEL_ID) in message and PATTERN in message
    assert f"imagezoo download {MODEL_ID}" in message and "skip_download=False" in message
    assert hub.calls == []


def test_skip_download_uses_complete_local_files(
    monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig
) -> None:
    monkeypatch.setattr(weights, "snapshot_download_fn", FakeHub(remote))
    files = weights.download_model_files(config)
    config.skip_download = True
    monkeypatch.setattr(weights, "snapshot_download_fn", None)  # would fail if called
    assert weights.download_model_files(config) == files
    _truncate(files[0])
    with pytest.raises(WeightsError, match="truncated"):
        weights.download_model_files(config)


def test_download_still_incomplete_errors(monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig) -> None:
    monkeypatch.setattr(weights, "snapshot_download_fn", FakeHub(remote, truncate_by=3))
    with pytest.raises(WeightsError, match=f"After downloading.*{SHARD1}.*truncated"):
        weights.download_model_files(config)


def test_download_nothing_matched_errors(monkeypatch: pytest.MonkeyPatch, remote: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(weights, "snapshot_download_fn", FakeHub(remote))
    cfg = ModelConfig(model_id=MODEL_ID, origin_file_pattern="vae/*.safetensors", local_model_path=tmp_path)
    with pytest.raises(WeightsError, match=r"no file matches origin_file_pattern='vae/\*\.safetensors'"):
        weights.download_model_files(cfg)


def test_download_failure_wrapped(monkeypatch: pytest.MonkeyPatch, config: ModelConfig) -> None:
    def broken(model_id: str, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(weights, "snapshot_download_fn", broken)
    with pytest.raises(WeightsError, match=f"{MODEL_ID}.*no route to host"):
        weights.download_model_files(config)


def test_folder_pattern(monkeypatch: pytest.MonkeyPatch, remote: Path, tmp_path: Path) -> None:
    hub = FakeHub(remote)
    monkeypatch.setattr(weights, "snapshot_download_fn", hub)
    cfg = ModelConfig(model_id=MODEL_ID, origin_file_pattern="tokenizer/", local_model_path=tmp_path)
    folder = tmp_path / MODEL_ID / "tokenizer"
    assert weights.download_model_files(cfg) == [folder]
    assert hub.calls[0]["allow_patterns"] == ["tokenizer/*"]
    assert (folder / "vocab.json").is_file()
    assert weights.find_complete_local_files(cfg) == [folder]


def _recorder(calls: list[tuple[tuple, dict]], remote: Path) -> Callable[..., str]:
    """A stand-in for a hub's snapshot_download: records the call, then delivers the files like the hub."""

    def record(*args: object, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        model_id = str(args[0] if args else kwargs["repo_id"])
        local_dir = Path(kwargs["local_dir"])
        FakeHub(remote)(model_id, local_dir=local_dir, allow_patterns=kwargs["allow_patterns"], source="")
        return str(local_dir)

    return record


def test_default_downloader_calls_modelscope(
    monkeypatch: pytest.MonkeyPatch, remote: Path, config: ModelConfig
) -> None:
    import modelscope

    real = modelscope.snapshot_download
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(modelscope, "snapshot_download", _recorder(calls, remote))
    assert weights.snapshot_download_fn is weights._default_snapshot_download
    files = weights.download_model_files(config)
    assert len(files) == 2 and len(calls) == 1
    args, kwargs = calls[0]
    bound = inspect.signature(real).bind(*args, **kwargs).arguments  # TypeError if an argument name is wrong
    assert bound["model_id"] == MODEL_ID
    assert bound["local_dir"] == str(Path(config.local_model_path) / MODEL_ID)
    assert bound["allow_patterns"] == [PATTERN, PATTERN + ".index.json", "transformer/config.json"]


def test_default_downloader_huggingface(monkeypatch: pytest.MonkeyPatch, remote: Path, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    real = huggingface_hub.snapshot_download
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _recorder(calls, remote))
    cfg = ModelConfig(model_id=MODEL_ID, origin_file_pattern=PATTERN, local_model_path=tmp_path, source="huggingface")
    assert len(weights.download_model_files(cfg)) == 2
    bound = inspect.signature(real).bind(*calls[0][0], **calls[0][1]).arguments
    assert bound["repo_id"] == MODEL_ID and bound["allow_patterns"][0] == PATTERN


def test_allow_patterns_match_real_repo_names() -> None:
    # The hubs filter with fnmatch; the extra patterns must catch the real Qwen-Image file names.
    patterns = weights._allow_patterns("transformer/diffusion_pytorch_model*.safetensors")
    for name in [
        "transformer/diffusion_pytorch_model-00001-of-00009.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/config.json",
    ]:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    assert weights._allow_patterns("vae/diffusion_pytorch_model.safetensors") == [
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    ]
    assert weights._allow_patterns(None) is None


# ---- load_safetensors ------------------------------------------------------------------------------------------------


def test_load_safetensors_dtype_cast(shard_dir: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    loaded = weights.load_safetensors([shard_dir / SHARD1, shard_dir / SHARD2], dtype=torch.bfloat16)
    assert loaded["a.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["a.weight"], tensors[SHARD1]["a.weight"].to(torch.bfloat16))
    assert loaded["b.index"].dtype == torch.int64  # integer tensors are never cast
    assert weights.load_safetensors([shard_dir])["a.weight"].dtype == torch.float32


def test_load_safetensors_duplicates_name_both_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"w": torch.ones(2), "v": torch.ones(1)}, tmp_path / "two.safetensors")
    with pytest.raises(WeightsError, match=r"'w'.*one\.safetensors.*two\.safetensors"):
        weights.load_safetensors([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])


def test_load_safetensors_corrupt_header_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage bytes that are not a safetensors header at all" * 3)
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*Delete it and download it again"):
        weights.load_safetensors([bad])
    with pytest.raises(WeightsError, match=r"bad\.safetensors"):
        weights.read_safetensors_header(bad)


def test_load_safetensors_truncated_named(shard_dir: Path) -> None:
    _truncate(shard_dir / SHARD1, 1)
    with pytest.raises(WeightsError, match=rf"{SHARD1} is truncated.*Delete it and download it again"):
        weights.load_safetensors([shard_dir / SHARD1])


def test_load_safetensors_wraps_safetensors_errors(monkeypatch: pytest.MonkeyPatch, shard_dir: Path) -> None:
    from safetensors import SafetensorError

    def failing_open(*args: object, **kwargs: object) -> None:
        raise SafetensorError("invalid dtype")

    monkeypatch.setattr(weights, "safe_open", failing_open)
    with pytest.raises(WeightsError, match=rf"{SHARD1}.*invalid dtype.*download it again"):
        weights.load_safetensors([shard_dir / SHARD1])


def test_load_safetensors_refuses_pickle(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"whatever")
    with pytest.raises(WeightsError, match=r"model\.ckpt.*pickle"):
        weights.load_safetensors([ckpt])


# ---- headers ---------------------------------------------------------------------------------------------------------


def test_read_header_without_loading_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_file(
        {"x": torch.zeros(3, 5, dtype=torch.bfloat16), "i": torch.zeros(2, dtype=torch.int32)},
        path,
        metadata={"format": "pt"},
    )
    # Overwrite the data region with garbage: the header reader must not touch (or need) it.
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header_end] + b"\xff" * (len(data) - header_end))
    monkeypatch.setattr(weights, "safe_open", None)  # no safetensors data reader is used
    assert weights.read_safetensors_header(path) == {"x": ("BF16", (3, 5)), "i": ("I32", (2,))}
    assert weights.read_safetensors_metadata(path) == {"format": "pt"}
    assert weights.read_shapes([path]) == {"x": (3, 5), "i": (2,)}


def test_read_shapes_union_and_config(shard_dir: Path, tmp_path: Path) -> None:
    files = [shard_dir / SHARD1, shard_dir / SHARD2]
    assert weights.read_shapes(files) == {"a.weight": (4, 3), "b.weight": (2,), "b.index": (3,)}
    assert weights.read_shapes([shard_dir]) == weights.read_shapes(files)
    assert weights.find_config_json(files) == {"num_layers": 2}
    assert weights.find_config_json([shard_dir]) == {"num_layers": 2}
    assert weights.find_config_json([]) is None
    (shard_dir / "config.json").unlink()
    assert weights.find_config_json(files) is None
    (shard_dir / "config.json").write_text("{broken")
    with pytest.raises(WeightsError, match=r"config\.json"):
        weights.find_config_json(files)
