"""Ulysses sequence parallelism for the Qwen-Image DiT: image tokens split over ranks, heads split in attention.

Each rank of a sequence group keeps 1/N of the image tokens (and their RoPE rotations, so every shard has its global
positions) through the whole block stack; text tokens are replicated. Around each joint attention one all-to-all
turns the image q/k/v from sequence-sharded (all heads) into head-sharded (all tokens): each rank then attends over
the full [text, image] sequence with H/N heads, text queries/keys/values sliced to those heads. A second all-to-all
sends the image outputs back to their token owners together with the text outputs (all heads gathered). The image
stream is gathered once after the last block. Per block that is 2 collectives moving about 4/N of the block's image
activations; everything else (modulation, MLPs, norms) runs on the local tokens only.

Token counts not divisible by N are padded at the end (the last shard); padded tokens are dropped before attention,
so they are never keys and nothing is masked for them. Hooks: the DiT's `run_blocks` is shadowed on the instance,
and each block's `attn.attention_fn` (the DiT's documented hook point) is set; `enable_sequence_parallel` returns the
undo. While the `SequenceGroup`'s size is 1 both hooks call straight through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from imagezoo.errors import ConfigError
from imagezoo.plugins.qwen_image.attention import joint_attention

if TYPE_CHECKING:
    from imagezoo.parallel import SequenceGroup
    from imagezoo.plugins.qwen_image.dit import QwenImageDiT


class _ShardState:
    """What the attention hooks need to know about the current forward: the true (unpadded) image token count."""

    def __init__(self) -> None:
        self.n_img = 0


class UlyssesAttention:
    """`joint_attention` with sequence-sharded image tokens: all-to-all to head shards and back around it.

    Args:
        sequence: The ranks sharing the sequence (size 1: plain attention).
        state: Shared with the block-stack hook, which sets the image token count.
        inner: The attention function to run on the head shard (a previously installed hook, or None for
            `joint_attention`).
    """

    def __init__(self, sequence: SequenceGroup, state: _ShardState, inner: Callable[..., Tensor] | None) -> None:
        self.sequence = sequence
        self.state = state
        self.inner = inner

    def __call__(
        self,
        q: Tensor,
        k_txt: Tensor,
        k_img: Tensor,
        v_txt: Tensor,
        v_img: Tensor,
        mask: Tensor | None,
        backend: str = "auto",
    ) -> Tensor:
        """Same contract as `attention.joint_attention`, with this rank's image shard in `q`, `k_img`, `v_img`.

        `q` is [text queries (all L, or none in the last block), local image queries]; the result has `q`'s layout.
        """
        attend = self.inner or joint_attention
        n = self.sequence.size
        if n == 1:
            return attend(q, k_txt, k_img, v_txt, v_img, mask, backend)
        b, n_q, heads, dim = q.shape
        local = k_img.shape[1]
        n_txt_q = n_q - local
        per = heads // n
        mine = slice(self.sequence.rank * per, (self.sequence.rank + 1) * per)
        n_img = self.state.n_img

        # (3, B, local, H, D) -> one chunk per destination rank's heads: (N, 3, B, local, H/N, D).
        qkv = torch.stack([q[:, n_txt_q:], k_img, v_img]).unflatten(3, (n, per)).permute(3, 0, 1, 2, 4, 5)
        qkv = self.sequence.all_to_all(qkv)  # [j] = rank j's tokens, this rank's heads
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :n_img]  # (3, B, S, H/N, D), padding dropped
        q_img, k_all, v_all = qkv.unbind(0)
        if mask is not None and mask.shape[1] == heads:  # a per-head mask: this rank's heads
            mask = mask[:, mine]
        out = attend(
            torch.cat([q[:, :n_txt_q, mine], q_img], 1),
            k_txt[:, :, mine],
            k_all,
            v_txt[:, :, mine],
            v_all,
            mask,
            backend,
        )  # (B, L_q + S, H/N, D)

        # Back: each rank gets its tokens' outputs for all heads; the text outputs ride along to every rank.
        out_img = F.pad(out[:, n_txt_q:], (0, 0, 0, 0, 0, n * local - n_img)).unflatten(1, (n, local))
        if n_txt_q:
            out_txt = out[:, None, :n_txt_q].expand(b, n, n_txt_q, per, dim)
            out_img = torch.cat([out_txt, out_img], 2)  # (B, N, L_q + local, H/N, D)
        back = self.sequence.all_to_all(out_img.transpose(0, 1))  # [j] = rank j's heads for this rank's tokens
        return back.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, L_q + local, H, D), heads in rank order


class _ShardedBlocks:
    """Replaces `QwenImageDiT.run_blocks` on one instance: shards the image stream in, gathers it out."""

    def __init__(
        self,
        dit: QwenImageDiT,
        run_blocks: Callable[..., tuple[Tensor, Tensor]],
        sequence: SequenceGroup,
        state: _ShardState,
    ) -> None:
        self.dit = dit
        self.run_blocks = run_blocks
        self.sequence = sequence
        self.state = state

    def __call__(
        self,
        start: int,
        stop: int,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """`QwenImageDiT.run_blocks` with the image tokens split over the sequence group (same results)."""
        n = self.sequence.size
        if n == 1:
            return self.run_blocks(start, stop, img, txt, temb_act, img_freqs, txt_freqs, mask)
        heads = self.dit.params.num_heads
        if heads % n:
            raise ConfigError(
                f"Sequence parallelism over {n} ranks needs the attention heads ({heads}) to be a multiple of {n}; "
                f"use a number of GPUs that divides {heads}, or parallel='cfg'."
            )
        n_img = img.shape[1]
        local = -(-n_img // n)
        pad = local * n - n_img
        if pad:  # zero tokens with zero rotations at the end; dropped before attention and after the gather
            img = F.pad(img, (0, 0, 0, pad))
            img_freqs = F.pad(img_freqs, (0, 0, 0, 0, 0, pad))
        shard = slice(self.sequence.rank * local, (self.sequence.rank + 1) * local)
        self.state.n_img = n_img
        out, txt = self.run_blocks(
            start, stop, img[:, shard].contiguous(), txt, temb_act, img_freqs[shard], txt_freqs, mask
        )
        gathered = self.sequence.all_gather(out)  # (N, B, local, width)
        return gathered.transpose(0, 1).flatten(1, 2)[:, :n_img], txt


def enable_sequence_parallel(dit: QwenImageDiT, sequence: SequenceGroup) -> Callable[[], None]:
    """Make every forward of `dit` split its image tokens over `sequence` (while its size is > 1).

    Composes with the step cache (it calls `run_blocks`), memory strategies and LoRA hooks on the linears, and an
    attention hook installed before (it runs on the head shard).

    Returns:
        A function that removes both hooks.

    Raises:
        ConfigError: Sequence parallelism is already enabled on this DiT.
    """
    if "run_blocks" in vars(dit):
        raise ConfigError("Sequence parallelism (or another run_blocks hook) is already installed on this DiT.")
    state = _ShardState()
    attentions = [block.attn for block in dit.transformer_blocks]
    previous = [attn.attention_fn for attn in attentions]
    for attn, inner in zip(attentions, previous, strict=True):
        attn.attention_fn = UlyssesAttention(sequence, state, inner)
    dit.run_blocks = _ShardedBlocks(dit, dit.run_blocks, sequence, state)

    def undo() -> None:
        vars(dit).pop("run_blocks", None)
        for attn, inner in zip(attentions, previous, strict=True):
            attn.attention_fn = inner

    return undo
