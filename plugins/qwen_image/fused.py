"""Fused GPU operations for DiT inference that `torch.compile` does not produce on its own.

`linear_gelu_tanh` runs the MLP up-projection with its bias and tanh-GELU in the GEMM epilogue (cuBLASLt, through
`torch._addmm_activation`): the 4x-wide hidden layer is written once, already activated, instead of written by the
GEMM and then read and rewritten by a GELU kernel. It is a custom op so that inductor keeps it whole rather than
decomposing it back into a GEMM and a pointwise kernel. The epilogue applies GELU to the float32 accumulator before
rounding to bf16, so it differs from the unfused path by float rounding only.

`linear_after` has the image V projection's GEMM write straight into the joint [text, image] values, instead of a
copy joining the projected streams.

`joint_qk_norm_rope` normalizes and rotates the q (or k) heads of both streams and writes them straight into the
joint [text, image] attention input, one Triton kernel per stream; it rounds once where the unfused path rounds twice.

`modulate_norm` and `residual_modulate_norm` are the blocks' modulated LayerNorms (the second with the gated residual
update before it) in one pass over each row, one Triton kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("imagezoo::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`gelu(x @ weight.T + bias, approximate="tanh")`, fused into the GEMM on CUDA.

    Args:
        x: (..., K) activations.
        weight: (N, K) weight in `x`'s dtype.
        bias: (N,) bias in `x`'s dtype.
    """
    if x.device.type != "cuda":
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_shape(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("imagezoo::linear_after", mutates_args=())
def linear_after(head: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`cat([head, x @ weight.T + bias], 1)`, the product written by the GEMM straight into its place.

    The joint attention values are [text, image] along the tokens: projected apart and then joined, the image part
    (25 MB per sample at 1024²) is written, read and written again by a copy; here it is written once. A custom op,
    so that inductor keeps the in-place GEMMs rather than rewriting them as a product and a copy.

    Args:
        head: (B, L, N) rows that come first (the text values, already projected).
        x: (B, S, K) inputs of the rows that follow.
        weight: (N, K) weight in `x`'s dtype.
        bias: (N,) bias in `x`'s dtype.

    Returns:
        (B, L + S, N) in `head`'s dtype.
    """
    b, n_head, width = head.shape
    out = head.new_empty((b, n_head + x.shape[1], width))
    out[:, :n_head] = head
    for i in range(b):  # each sample's rows are contiguous in `out`, the batch's are not
        torch.addmm(bias, x[i], weight.t(), out=out[i, n_head:])
    return out


@linear_after.register_fake
def _linear_after_shape(head: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return head.new_empty((head.shape[0], head.shape[1] + x.shape[1], head.shape[2]))


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` whose call is exactly `F.linear` (no hooks, no patched forward).

    LoRA, FP8 compute and memory strategies change a linear through hooks or a replaced `forward`; a fused kernel
    reading the weight directly would bypass them.
    """
    return (
        type(module) is nn.Linear
        and "forward" not in vars(module)
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


# ----------------------------------------------------------------------------------------------------------------------
# Modulated LayerNorm, and the gated residual update before it


def _modulate_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, then `* (1 + scale) + shift`, in float32, rounded once to `x`'s dtype."""
    xf = x.float()
    return (F.layer_norm(xf, xf.shape[-1:], eps=eps) * (1 + scale.float()) + shift.float()).to(x.dtype)


def _check_modulation(x: Tensor, *vectors: Tensor) -> None:
    if x.dim() != 3 or any(v.shape not in ((x.shape[0], 1, x.shape[2]), (1, 1, x.shape[2])) for v in vectors):
        shapes = [tuple(v.shape) for v in vectors]
        raise ValueError(f"expected x (B, N, D) and (B or 1, 1, D) modulation vectors; got {tuple(x.shape)}, {shapes}")


def _modulate_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """`layer_norm(x) * (1 + scale) + shift`: a block's modulated norm, one pass over `x` on CUDA.

    Compiled, inductor's kernels for the block's norms reached 1.2-2.2 TB/s of an H100's 3.35; the Triton kernel
    holds each row in registers and reads it once (about 2.6 TB/s).

    Args:
        x: (B, N, D) tokens.
        shift, scale: (B or 1, 1, D) modulation of each sample.
        eps: LayerNorm epsilon.

    Returns:
        (B, N, D) in `x`'s dtype.
    """
    _check_modulation(x, shift, scale)
    if _kernel_ready(x):
        return _launch_modulate_norm(x, None, None, shift, scale, eps)[1]
    return _modulate_norm_reference(x, shift, scale, eps)


def _residual_modulate_norm_pieces(
    x: Tensor, updates: list[Tensor], gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    _check_modulation(x, gate, shift, scale)
    if _kernel_ready(x) and all(u.dtype == x.dtype for u in updates):
        residual, normed = _launch_modulate_norm(x, updates, gate, shift, scale, eps)
        return residual, normed
    update = updates[0] if len(updates) == 1 else torch.cat(updates)
    residual = (x.float() + gate.float() * update.float()).to(x.dtype)
    return residual, _modulate_norm_reference(residual, shift, scale, eps)


def _modulate_norm_shape(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


def _residual_modulate_norm_pieces_shape(
    x: Tensor, updates: list[Tensor], gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


# ----------------------------------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE straight into the joint [text, image] layout


def _norm_rope_reference(x: Tensor, weight: Tensor, freqs: Tensor, eps: float) -> Tensor:
    """RMSNorm (weight) then RoPE of interleaved pairs, in float32, rounded once to `x`'s dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y0, y1 = y.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    return torch.stack([y0 * cos - y1 * sin, y0 * sin + y1 * cos], -1).flatten(-2).to(x.dtype)


def _joint_qk_norm_rope(
    txt: Tensor, img: Tensor, txt_weight: Tensor, img_weight: Tensor, txt_freqs: Tensor, img_freqs: Tensor, eps: float
) -> Tensor:
    """Joint queries or keys `[rope(rms_norm(txt)), rope(rms_norm(img))]` along the tokens; one pass per stream on CUDA.

    Attention needs both streams' heads normalized, rotated and side by side in one tensor. As separate ops (even
    compiled), the rotated streams are stored in float32 and copied into the joint tensor afterwards; here each
    projection is read once and the joint tensor written once, in the compute dtype.

    Args:
        txt: (B, L, H, D) text projections (after the linear, before the norm).
        img: (B, S, H, D) image projections.
        txt_weight, img_weight: (D,) RMSNorm weights of each stream.
        txt_freqs, img_freqs: (L, D/2, 2) and (S, D/2, 2) float32 rotations [cos, sin].
        eps: RMSNorm epsilon.

    Returns:
        (B, L + S, H, D) in `txt`'s dtype.
    """
    half = txt.shape[-1] // 2
    triton_ready = _TRITON and txt.dtype in _TRITON_TYPES and img.dtype == txt.dtype
    if txt.device.type == "cuda" and triton_ready and half & (half - 1) == 0:  # Triton ranges are powers of two
        return _launch_joint_qk_norm_rope(txt, img, txt_weight, img_weight, txt_freqs, img_freqs, eps)
    return torch.cat(
        [_norm_rope_reference(txt, txt_weight, txt_freqs, eps), _norm_rope_reference(img, img_weight, img_freqs, eps)],
        1,
    )


def _joint_qk_norm_rope_shape(
    txt: Tensor, img: Tensor, txt_weight: Tensor, img_weight: Tensor, txt_freqs: Tensor, img_freqs: Tensor, eps: float
) -> Tensor:
    b, n_txt, heads, dim = txt.shape
    return txt.new_empty((b, n_txt + img.shape[1], heads, dim))


try:
    import triton
    import triton.language as tl

    _TRITON = True
    _TRITON_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
except ImportError:  # CPU-only installs: the reference path serves
    _TRITON = False

modulate_norm = torch.library.custom_op("imagezoo::modulate_norm", mutates_args=())(_modulate_norm)
modulate_norm.register_fake(_modulate_norm_shape)
_residual_modulate_norm_op = torch.library.custom_op("imagezoo::residual_modulate_norm", mutates_args=())(
    _residual_modulate_norm_pieces
)
_residual_modulate_norm_op.register_fake(_residual_modulate_norm_pieces_shape)


def residual_modulate_norm(
    x: Tensor, update: Tensor | Sequence[Tensor], gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """`x + gate * update` (the gated residual after attention) and its modulated norm, in one pass on CUDA.

    Args:
        x: (B, N, D) residual stream.
        update: (B, N, D) branch output, or pieces of it along the batch ((b_i, N, D) each, summing to B): attention
            run per sample gives its outputs this way, and the op reads them where they are instead of after a copy
            joining them.
        gate, shift, scale: (B or 1, 1, D) modulation of each sample.
        eps: LayerNorm epsilon.

    Returns:
        `(residual, normed)`, both (B, N, D) in `x`'s dtype; `normed` is computed from the rounded `residual`,
        as the unfused ops do.
    """
    updates = [update] if isinstance(update, Tensor) else list(update)
    shapes = [tuple(u.shape) for u in updates]
    if not updates or any(s[1:] != x.shape[1:] for s in shapes) or sum(s[0] for s in shapes) != x.shape[0]:
        what = shapes[0] if isinstance(update, Tensor) else f"pieces {shapes}"
        raise ValueError(f"update {what} must have the shape of x {tuple(x.shape)}, or be its pieces along the batch")
    return _residual_modulate_norm_op(x, updates, gate, shift, scale, eps)


def _kernel_ready(x: Tensor) -> bool:
    return x.device.type == "cuda" and _TRITON and x.dtype in _TRITON_TYPES


# A plain custom op, opaque to inductor. As a `torch.library.triton_op` (launched from inductor's generated code) it
# lost on torch 2.11: 1024² forward 136.2 ms against 132.7 unfused in its run; this way 128.7 against 130.4.
joint_qk_norm_rope = torch.library.custom_op("imagezoo::joint_qk_norm_rope", mutates_args=())(_joint_qk_norm_rope)
joint_qk_norm_rope.register_fake(_joint_qk_norm_rope_shape)


if _TRITON:

    @triton.jit
    def _unpack_pairs(words, ELEM: tl.constexpr, BITS: tl.constexpr):
        # A word holds one RoPE pair (channels 2j, 2j+1) of BITS-bit floats, the even one in the low bits (little
        # endian). Whole-word loads vectorize; loading the partner channel at `cols ^ 1` did not (~0.9 TB/s).
        if BITS == 16:
            even = words.to(tl.int16).to(ELEM, bitcast=True)
            odd = (words >> 16).to(tl.int16).to(ELEM, bitcast=True)
        else:
            even = words.to(tl.int32).to(ELEM, bitcast=True)
            odd = (words >> 32).to(tl.int32).to(ELEM, bitcast=True)
        return even.to(tl.float32), odd.to(tl.float32)

    @triton.jit
    def _pack_pairs(even, odd, ELEM: tl.constexpr, BITS: tl.constexpr):
        if BITS == 16:
            low = even.to(ELEM).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            high = odd.to(ELEM).to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:
            low = even.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            high = odd.to(tl.int32, bitcast=True).to(tl.int64) << 32
        return low | high

    @triton.jit
    def _norm_rope_rows(
        x_ptr, w_ptr, f_ptr, out_ptr, block, n_rows, heads, tokens, out_tokens, offset, eps, ELEM, BITS, HALF, ROWS
    ):
        # A row = one (sample, token, head) vector of HALF pairs, read from one stream (B, tokens, H, HALF) and
        # written at token `offset` of the joint (B, out_tokens, H, HALF) output.
        rows = block * ROWS + tl.arange(0, ROWS)
        live = (rows < n_rows)[:, None]
        pairs = tl.arange(0, HALF)[None, :]
        words = tl.load(x_ptr + rows.to(tl.int64)[:, None] * HALF + pairs, mask=live, other=0)
        x0, x1 = _unpack_pairs(words, ELEM, BITS)
        rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1)) / (2 * HALF) + eps)[:, None]
        y0 = x0 * rstd * tl.load(w_ptr + 2 * pairs).to(tl.float32)
        y1 = x1 * rstd * tl.load(w_ptr + 2 * pairs + 1).to(tl.float32)
        token = (rows // heads) % tokens
        rotations = tl.load(f_ptr + token.to(tl.int64)[:, None] * HALF + pairs, mask=live, other=0)
        cos, sin = _unpack_pairs(rotations, tl.float32, 32)
        sample = rows // (heads * tokens)
        dst_rows = rows + (sample * (out_tokens - tokens) + offset) * heads
        dst = out_ptr + dst_rows.to(tl.int64)[:, None] * HALF + pairs
        tl.store(dst, _pack_pairs(y0 * cos - y1 * sin, y0 * sin + y1 * cos, ELEM, BITS), mask=live)

    @triton.jit
    def _joint_norm_rope_kernel(
        txt_ptr,
        img_ptr,
        txt_w_ptr,
        img_w_ptr,
        txt_f_ptr,
        img_f_ptr,
        out_ptr,
        txt_blocks,
        heads,
        n_txt,
        n_img,
        batch,
        eps,
        ELEM: tl.constexpr,
        BITS: tl.constexpr,
        HALF: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # One launch for both streams: the first `txt_blocks` programs take the text rows, the rest the image rows.
        block = tl.program_id(0)
        out_tokens = n_txt + n_img
        if block < txt_blocks:
            _norm_rope_rows(
                txt_ptr, txt_w_ptr, txt_f_ptr, out_ptr, block, batch * n_txt * heads, heads, n_txt, out_tokens, 0,
                eps, ELEM, BITS, HALF, ROWS,
            )  # fmt: skip
        else:
            _norm_rope_rows(
                img_ptr, img_w_ptr, img_f_ptr, out_ptr, block - txt_blocks, batch * n_img * heads, heads, n_img,
                out_tokens, n_txt, eps, ELEM, BITS, HALF, ROWS,
            )  # fmt: skip


if _TRITON:

    @triton.jit
    def _modulate_norm_kernel(
        x_ptr,
        update_ptr,
        gate_ptr,
        shift_ptr,
        scale_ptr,
        residual_ptr,
        out_ptr,
        tokens,
        modulation_stride,
        width,
        eps,
        RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per token: its whole row in registers, read once, written once (plus the residual).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < width
        at = row * width + cols
        modulation = (row // tokens) * modulation_stride + cols
        x = tl.load(x_ptr + at, mask=live, other=0.0).to(tl.float32)
        if RESIDUAL:
            update = tl.load(update_ptr + at, mask=live, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + modulation, mask=live, other=0.0).to(tl.float32)
            residual = (x + gate * update).to(residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + at, residual, mask=live)
            x = residual.to(tl.float32)
        mean = tl.sum(x, 0) / width
        centered = tl.where(live, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / width + eps)
        scale = tl.load(scale_ptr + modulation, mask=live, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + modulation, mask=live, other=0.0).to(tl.float32)
        out = centered * rstd * (1.0 + scale) + shift
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=live)


def _launch_modulate_norm(
    x: Tensor, updates: list[Tensor] | None, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor | None, Tensor]:
    b, tokens, width = x.shape

    def rows(vector: Tensor) -> Tensor:  # (B or 1, 1, D) -> contiguous (B or 1, D) in x's dtype
        return vector.reshape(vector.shape[0], width).to(x.dtype).contiguous()

    shift, scale = rows(shift), rows(scale)
    gate = shift if gate is None else rows(gate)
    x = x.contiguous()
    out = torch.empty_like(x)
    residual = torch.empty_like(x) if updates is not None else None
    block = triton.next_power_of_2(width)
    start = 0
    # One launch per piece of the update, on the matching batch rows of everything else.
    for update in updates or [None]:
        stop = b if update is None else start + update.shape[0]

        def mine(tensor: Tensor, start: int = start, stop: int = stop) -> Tensor:
            # Views only for a piece: the whole batch (the common case) launches on the tensors themselves.
            return tensor if tensor.shape[0] in (1, stop - start) else tensor[start:stop]

        _modulate_norm_kernel[((stop - start) * tokens,)](
            mine(x),
            mine(x) if update is None else update.contiguous(),
            mine(gate),
            mine(shift),
            mine(scale),
            mine(out) if residual is None else mine(residual),
            mine(out),
            tokens,
            width if shift.shape[0] > 1 else 0,
            width,
            eps,
            RESIDUAL=update is not None,
            BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )
        start = stop
    return residual, out


_ROWS_PER_PROGRAM = 32
# Element size in bytes -> (integer type holding one RoPE pair, bits per element).
_PAIR_WORDS = {2: (torch.int32, 16), 4: (torch.int64, 32)}


def _launch_joint_qk_norm_rope(
    txt: Tensor, img: Tensor, txt_weight: Tensor, img_weight: Tensor, txt_freqs: Tensor, img_freqs: Tensor, eps: float
) -> Tensor:
    b, n_txt, heads, dim = txt.shape
    n_img = img.shape[1]
    word, bits = _PAIR_WORDS[txt.element_size()]
    out = txt.new_empty((b, n_txt + n_img, heads, dim))
    txt_blocks = triton.cdiv(b * n_txt * heads, _ROWS_PER_PROGRAM)
    img_blocks = triton.cdiv(b * n_img * heads, _ROWS_PER_PROGRAM)
    _joint_norm_rope_kernel[(txt_blocks + img_blocks,)](
        txt.contiguous().view(word),
        img.contiguous().view(word),
        txt_weight.contiguous(),
        img_weight.contiguous(),
        txt_freqs.float().contiguous().view(torch.int64),
        img_freqs.float().contiguous().view(torch.int64),
        out.view(word),
        txt_blocks,
        heads,
        n_txt,
        n_img,
        b,
        eps,
        ELEM=_TRITON_TYPES[txt.dtype],
        BITS=bits,
        HALF=dim // 2,
        ROWS=_ROWS_PER_PROGRAM,
    )
    return out
