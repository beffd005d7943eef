"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, run on the templated prompt.

Only transformers' text model (`Qwen2_5_VLTextModel`) is built and loaded; the vision tower and `lm_head` of the
published checkpoint are dropped, since text-to-image uses neither. Output matches diffusers' `QwenImagePipeline`
(`_get_qwen_prompt_embeds` + `encode_prompt`): final hidden state after the last RMSNorm, template prefix removed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imagezoo.errors import ConfigError, InputError, WeightsError
from imagezoo.interfaces import TextConditioning
from imagezoo.plugins.qwen_image.tokenizer import PROMPT_TEMPLATE, SPECIAL_TOKENS, prompt_drop_index
from imagezoo.state_dict import assign_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512
"""Official default cap on encoded tokens (diffusers' `max_sequence_length`)."""
MAX_LENGTH_LIMIT = 1024
"""Largest cap the official pipeline accepts."""

_WHAT = "Qwen2.5-VL text encoder"
# Prefixes of the language model's own submodules inside the old published layout `model.*`.
_TEXT_SUBMODULES = ("embed_tokens.", "layers.", "norm.")
_NEW_PREFIX = "model.language_model."
_OLD_PREFIX = "model."
_DROPPED_PREFIXES = ("visual.", "model.visual.", "lm_head.")
# Non-persistent in transformers (recomputed at build); a few old exports saved it anyway.
_ROTARY_KEY = "rotary_emb.inv_freq"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class TextEncoderParams:
    """Architecture of the Qwen2.5-VL language model (head size = hidden_size / num_heads)."""

    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        sizes = (self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads, self.intermediate_size)
        if min(sizes) < 1 or self.vocab_size < 1:
            raise ConfigError(f"Text encoder: sizes must be positive, got {self}.")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"Text encoder: hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                f"{self.num_kv_heads} must divide evenly (hidden by heads, heads by kv heads)."
            )
        # transformers splits the rotary half-dimension into the three mrope axes; a wrong sum fails deep inside.
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"Text encoder: mrope_section {list(self.mrope_section)} must be 3 numbers summing to head_dim/2 "
                f"= {self.head_dim // 2}."
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TextEncoderParams:
        """Read the official `text_encoder/config.json` (flat pre-v5 layout or with a `text_config` section).

        Raises:
            ConfigError: A required field is missing.
        """
        text = config.get("text_config") or {}
        if not isinstance(text, Mapping):
            text = text.to_dict()

        def field(name: str, default: Any = None) -> Any:
            value = text.get(name, config.get(name, default))
            if value is None:
                raise ConfigError(f"Text encoder config has no '{name}'; pass the text_encoder/config.json file.")
            return value

        rope: Mapping[str, Any] = {}
        for source in (text, config):
            rope = source.get("rope_parameters") or source.get("rope_scaling") or {}
            if rope:
                break
        return cls(
            hidden_size=int(field("hidden_size")),
            num_layers=int(field("num_hidden_layers")),
            num_heads=int(field("num_attention_heads")),
            num_kv_heads=int(field("num_key_value_heads", field("num_attention_heads"))),
            intermediate_size=int(field("intermediate_size")),
            vocab_size=int(field("vocab_size")),
            rope_theta=float(rope.get("rope_theta", field("rope_theta", cls.rope_theta))),
            mrope_section=tuple(rope.get("mrope_section", cls.mrope_section)),
            rms_eps=float(field("rms_norm_eps", cls.rms_eps)),
        )

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]], *, mrope_section: Sequence[int] | None = None
    ) -> TextEncoderParams:
        """Infer the architecture from tensor shapes (any accepted key layout).

        Head counts are not visible in shapes; the head size is `2 * sum(mrope_section)`. Without `mrope_section`,
        Qwen2.5-VL's (16, 24, 24) (head size 128, every published size) is used when it divides the projection
        widths, else TINY_TEXT_ENCODER's. rope_theta and rms_eps are not visible either: Qwen2.5-VL's are used.

        Raises:
            WeightsError: A tensor the architecture needs is missing.
        """
        named = {}
        for key, shape in shapes.items():
            new_key = _rename(key)
            if new_key is not None:
                named[new_key] = tuple(shape)
        needed = (
            "embed_tokens.weight",
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.k_proj.weight",
            "layers.0.mlp.gate_proj.weight",
        )
        missing = [k for k in needed if k not in named]
        if missing:
            raise WeightsError(f"{_WHAT}: cannot infer the architecture, missing {', '.join(missing)}.")
        vocab_size, hidden = named["embed_tokens.weight"]
        q_width = named["layers.0.self_attn.q_proj.weight"][0]
        kv_width = named["layers.0.self_attn.k_proj.weight"][0]
        candidates = (
            [tuple(mrope_section)]
            if mrope_section is not None
            else [REAL_TEXT_ENCODER.mrope_section, TINY_TEXT_ENCODER.mrope_section]
        )
        section = next((s for s in candidates if q_width % (2 * sum(s)) == 0 and kv_width % (2 * sum(s)) == 0), None)
        if section is None:
            raise ConfigError(
                f"{_WHAT}: projection widths {q_width}/{kv_width} fit no known head size "
                f"{[2 * sum(s) for s in candidates]}; pass the text_encoder/config.json."
            )
        head_dim = 2 * sum(section)
        layers = {int(m.group(1)) for k in named if (m := _LAYER_RE.match(k))}
        return cls(
            hidden_size=hidden,
            num_layers=max(layers) + 1,
            num_heads=q_width // head_dim,
            num_kv_heads=kv_width // head_dim,
            intermediate_size=named["layers.0.mlp.gate_proj.weight"][0],
            vocab_size=vocab_size,
            mrope_section=section,
        )

    def to_config(self) -> dict[str, Any]:
        """A `config.json` dict in the published (flat) layout, accepted by transformers' `Qwen2_5_VLConfig`.

        The vision tower is the published 7B one for the real size and a one-block placeholder otherwise, so the
        full `Qwen2_5_VLForConditionalGeneration` can be built (the text path never runs it).
        """
        if self == REAL_TEXT_ENCODER:
            vision = {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "fullatt_block_indexes": [7, 15, 23, 31],
            }
        else:
            vision = {
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_heads": 2,
                "fullatt_block_indexes": [0],
            }
        vision.update(
            {
                "model_type": "qwen2_5_vl",
                "hidden_act": "silu",
                "in_channels": 3,
                "out_hidden_size": self.hidden_size,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "temporal_patch_size": 2,
                "tokens_per_second": 2,
                "window_size": 112,
                "initializer_range": 0.02,
            }
        )
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
            "eos_token_id": SPECIAL_TOKENS["<|im_end|>"],
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "image_token_id": SPECIAL_TOKENS["<|image_pad|>"],
            "video_token_id": SPECIAL_TOKENS["<|video_pad|>"],
            "vision_start_token_id": SPECIAL_TOKENS["<|vision_start|>"],
            "vision_end_token_id": SPECIAL_TOKENS["<|vision_end|>"],
            "vision_token_id": SPECIAL_TOKENS["<|vision_pad|>"],
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 128000,
            "max_window_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_eps,
            "rope_scaling": {"mrope_section": list(self.mrope_section), "rope_type": "default", "type": "default"},
            "rope_theta": self.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": False,
            "use_cache": True,
            "use_sliding_window": False,
            "vision_config": vision,
            "vocab_size": self.vocab_size,
        }

    def text_config(self) -> PretrainedConfig:
        """transformers' config object of the language model alone."""
        from transformers import Qwen2_5_VLConfig

        # Going through the full config lets transformers apply its own flat-layout and rope conversions.
        return Qwen2_5_VLConfig(**self.to_config()).text_config


REAL_TEXT_ENCODER = TextEncoderParams()
"""Qwen2.5-VL-7B's language model, as shipped with Qwen/Qwen-Image."""
# vocab_size stays real so the real tokenizer's ids are valid; head size 16 = 2 * (2 + 3 + 3).
TINY_TEXT_ENCODER = TextEncoderParams(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, mrope_section=(2, 3, 3)
)
"""A random-weight test size with the real vocabulary."""


def _rename(key: str) -> str | None:
    """Name of `key` in the language model, None when it is deliberately dropped, or `key` itself if unknown."""
    if key.startswith(_DROPPED_PREFIXES):
        return None
    if key.startswith(_NEW_PREFIX):
        new_key = key[len(_NEW_PREFIX) :]
    elif key.startswith(_OLD_PREFIX) and key[len(_OLD_PREFIX) :].startswith(_TEXT_SUBMODULES):
        new_key = key[len(_OLD_PREFIX) :]
    else:
        new_key = key
    return None if new_key == _ROTARY_KEY else new_key


def is_text_encoder_checkpoint(keys: Iterable[str]) -> bool:
    """Whether `keys` look like a Qwen2.5-VL (or bare Qwen2.5 language model) checkpoint, in any accepted layout."""
    names = set(keys)
    return any(
        f"{prefix}embed_tokens.weight" in names and f"{prefix}layers.0.self_attn.q_proj.weight" in names
        for prefix in (_NEW_PREFIX, _OLD_PREFIX, "")
    )


def normalize_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Qwen2.5-VL checkpoint to the language model's keys (`embed_tokens.weight`, `layers.{i}.*`, `norm.*`).

    Accepts the published layout (`model.*`, `visual.*`, `lm_head.weight`) and transformers' newer one
    (`model.language_model.*`, `model.visual.*`). The vision tower and `lm_head` are dropped on purpose;
    any other key is kept under its own name so loading reports it as unexpected.

    Raises:
        WeightsError: Two checkpoint keys map to the same name (both layouts mixed).
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new_key = _rename(key)
        if new_key is None:
            continue
        if new_key in out:
            raise WeightsError(
                f"{_WHAT}: checkpoint keys {origin[new_key]} and {key} both name {new_key}; the files mix the old "
                "and new transformers layouts. Load one checkpoint only."
            )
        out[new_key] = tensor
        origin[new_key] = key
    return out


class QwenTextEncoder:
    """Encodes prompts with Qwen-Image's template into (B, L, hidden) embeddings and a (B, L) bool mask.

    Embeddings keep the model's dtype (bf16 for the published weights), as in the official pipeline.

    Attributes:
        model: The language model (`Qwen2_5_VLTextModel`); memory strategies may move or wrap it.
        tokenizer: The Qwen2 tokenizer.
        max_length: Default cap on encoded tokens per prompt.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_length: int = DEFAULT_MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = _check_max_length(max_length)
        self.drop_index = prompt_drop_index(tokenizer)
        pad_id = tokenizer.pad_token_id
        self.pad_id = SPECIAL_TOKENS["<|endoftext|>"] if pad_id is None else int(pad_id)

    @property
    def device(self) -> torch.device:
        """Device of the embedding table (where token ids are sent)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the model and of the returned embeddings."""
        return self.model.get_input_embeddings().weight.dtype

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> TextConditioning:
        """Encode a batch of prompts.

        Args:
            prompts: Prompts (a single str is treated as a batch of one).
            max_length: Cap on returned tokens per prompt, counted after the dropped template prefix (the prompt plus
                the template's closing tokens), as the official `max_sequence_length`; default `self.max_length`,
                at most 1024. Longer prompts are truncated with a warning.

        Returns:
            `embeds` (B, L, hidden) in the model's dtype, right-padded with zeros, and `mask` (B, L) bool.

        Raises:
            InputError: No prompts, a non-str prompt, or `max_length` outside 1..1024.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"encode() needs a non-empty sequence of str prompts, got {prompts!r}.")
        cap = _check_max_length(self.max_length if max_length is None else max_length)
        drop = self.drop_index

        sequences = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts])["input_ids"]
        kept: list[list[int]] = []
        for index, ids in enumerate(sequences):
            length = len(ids) - drop
            if length > cap:
                logger.warning(
                    "Prompt %d is %d tokens long (with the template's closing tokens) but max_length is %d; "
                    "only its first %d tokens are encoded.",
                    index,
                    length,
                    cap,
                    cap,
                )
            # The model is causal: cutting the input gives the same states as cutting the output, at lower cost.
            kept.append(list(ids[: drop + cap]))

        width = max(len(ids) for ids in kept)
        device = self.device
        input_ids = torch.full((len(kept), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), width), dtype=torch.long)
        for row, ids in enumerate(kept):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # transformers' text-only positions: count of real tokens so far, equal on the 3 mrope axes. With right
        # padding every prompt's tokens sit at 0..n-1, exactly as when it is encoded alone.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        positions = positions.unsqueeze(0).expand(3, -1, -1)

        with torch.no_grad():
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
            ).last_hidden_state

        lengths = [len(ids) - drop for ids in kept]
        longest = max(lengths)
        embeds = hidden.new_zeros(len(kept), longest, hidden.shape[-1])
        mask = torch.zeros(len(kept), longest, dtype=torch.bool, device=hidden.device)
        for row, length in enumerate(lengths):
            embeds[row, :length] = hidden[row, drop : drop + length]
            mask[row, :length] = True
        return TextConditioning(embeds=embeds, mask=mask)


def _check_max_length(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LENGTH_LIMIT:
        raise InputError(
            f"max_length={value!r} is not allowed: the Qwen-Image text encoder takes 1 to {MAX_LENGTH_LIMIT} tokens."
        )
    return value


def build_text_encoder(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> QwenTextEncoder:
    """Build the text encoder from checkpoint tensors without materializing random weights.

    Args:
        state_dict: Checkpoint tensors in either published layout (vision tower and lm_head are ignored).
        config: The `text_encoder/config.json` contents, or None to infer the architecture from shapes.
        tokenizer: From `load_tokenizer`.
        dtype: Cast floating-point weights to this dtype; None keeps the checkpoint's.
        device: Where the weights go.

    Raises:
        WeightsError: Missing, unexpected or wrongly shaped keys (named in the message).
        ConfigError: The config is unusable.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    weights = normalize_text_encoder_keys(state_dict)
    if config is not None:
        params = TextEncoderParams.from_config(config)
    else:
        params = TextEncoderParams.from_shapes({k: tuple(v.shape) for k, v in weights.items()})
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(params.text_config())
    assign_state_dict(model, weights, what=_WHAT, dtype=dtype, device=device)
    # inv_freq buffers are non-persistent, so the checkpoint cannot fill them: recompute them (fp32, as
    # transformers does) on the target device.
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise WeightsError(f"{_WHAT}: tensors left unloaded after building: {', '.join(leftover)}.")
    model.eval().requires_grad_(False)
    return QwenTextEncoder(model, tokenizer)
