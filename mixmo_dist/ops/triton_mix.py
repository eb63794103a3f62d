"""The fused Triton mask-and-mix kernel: z = sum_m mask_m * feats_m without ever building the masks.

Shape legend: M members, B batch rows, C channels, H/W spatial size of the encoder output.

The masks of `mixmo_dist.ops.mixing` are described by one box per sample and two coefficients per (member, sample):
mask_m(b, h, w) = coef_in[m, b] inside box b, coef_out[m, b] outside. Each program of the kernels below handles a
2-D tile that lies inside one sample, recomputes "inside the box" from the tile's row and column indices, reads each
member map once and writes z once (forward), or reads grad_z once and writes the M member gradients once (backward).
That is the memory floor of the mixing block: the same bytes as `a + b`.

Tiles, per layout (`feats` all NCHW-contiguous or all channels_last; the output follows the input):
- NCHW: one (b, c) plane is a contiguous [H, W] matrix; a tile is [ROWS, COLS] of it, so h and w are the tile's row
  and column indices and no integer division runs per element.
- channels_last: one sample is a contiguous [H*W, C] matrix; a tile is [ROWS pixels, COLS channels], so h, w come from
  one division per pixel (not per element) and "inside the box" is broadcast over the channels.

The ops are registered with `torch.library.triton_op` (namespace `mixmo`) and `register_autograd`, so they run in
eager mode and torch.compile (Inductor) sees the kernels. Boxes and coefficients are sampled constants: they get no
gradient. Triton is imported here unconditionally: import this module only behind an ImportError guard (as
`mixing.mix_features` does). Set TRITON_INTERPRET=1 before importing it to run the kernels on CPU tensors.
"""

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_MEMBERS = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: large enough to keep several 16-byte loads per thread in flight, small enough for registers.
_TILE_ELEMS = 2048
# Widest tile row; wider rows (huge W or C) are split into several column blocks.
_MAX_COLS = 256


@triton.jit
def _tile_coords(
    boxes_ptr,
    n_rows,
    n_cols,
    width,
    channels,
    CHANNELS_LAST: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """Where this program's tile lies: (b, flat int64 offsets [ROWS, COLS], valid [ROWS, COLS], inbox [ROWS, COLS])."""
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(n_cols, COLS)
    n_row_blocks = tl.cdiv(n_rows, ROWS)
    col_block = pid % n_col_blocks
    rest = pid // n_col_blocks
    row_block = rest % n_row_blocks
    # `outer` indexes the contiguous [n_rows, n_cols] matrices: planes (b, c) for NCHW, samples for channels_last.
    outer = rest // n_row_blocks
    if CHANNELS_LAST:
        b = outer
    else:
        b = outer // channels
    y0 = tl.load(boxes_ptr + b * 4).to(tl.int32)
    y1 = tl.load(boxes_ptr + b * 4 + 1).to(tl.int32)
    x0 = tl.load(boxes_ptr + b * 4 + 2).to(tl.int32)
    x1 = tl.load(boxes_ptr + b * 4 + 3).to(tl.int32)
    rows = row_block * ROWS + tl.arange(0, ROWS)
    cols = col_block * COLS + tl.arange(0, COLS)
    if CHANNELS_LAST:
        # Rows are pixels h * W + w, columns are channels: one division per pixel, broadcast over channels.
        h = rows // width
        w = rows - h * width
        row_in = (h >= y0) & (h < y1) & (w >= x0) & (w < x1)
        inbox = row_in[:, None] & (cols >= 0)[None, :]  # (cols >= 0) only broadcasts to the tile's shape
    else:
        # Rows are h, columns are w of one (b, c) plane: the box test is separable.
        row_in = (rows >= y0) & (rows < y1)
        col_in = (cols >= x0) & (cols < x1)
        inbox = row_in[:, None] & col_in[None, :]
    valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    # int64 base: B*C*H*W can pass 2**31 at ImageNet sizes with large batches.
    base = outer.to(tl.int64) * n_rows * n_cols
    offs = base + (rows[:, None] * n_cols + cols[None, :])
    return b, offs, valid, inbox


@triton.jit
def _mask_value(coef_in_ptr, coef_out_ptr, batch, b, m: tl.constexpr, inbox):
    """Member m's mask over the tile [ROWS, COLS] (float32), from its two coefficients for sample b."""
    c_in = tl.load(coef_in_ptr + m * batch + b)
    c_out = tl.load(coef_out_ptr + m * batch + b)
    return tl.where(inbox, c_in, c_out)


@triton.jit
def _mix_fwd_kernel(
    x0_ptr,
    x1_ptr,
    x2_ptr,
    x3_ptr,
    x4_ptr,
    x5_ptr,
    x6_ptr,
    x7_ptr,
    out_ptr,
    boxes_ptr,
    coef_in_ptr,
    coef_out_ptr,
    batch,
    n_rows,
    n_cols,
    width,
    channels,
    M: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """out = sum_m mask_m * x_m over one tile; pointers of members m >= M are placeholders and never read."""
    b, offs, valid, inbox = _tile_coords(boxes_ptr, n_rows, n_cols, width, channels, CHANNELS_LAST, ROWS, COLS)
    # Issue every member's load before the arithmetic so they are all in flight together.
    v0 = tl.load(x0_ptr + offs, mask=valid, other=0.0)
    if M > 1:
        v1 = tl.load(x1_ptr + offs, mask=valid, other=0.0)
    if M > 2:
        v2 = tl.load(x2_ptr + offs, mask=valid, other=0.0)
    if M > 3:
        v3 = tl.load(x3_ptr + offs, mask=valid, other=0.0)
    if M > 4:
        v4 = tl.load(x4_ptr + offs, mask=valid, other=0.0)
    if M > 5:
        v5 = tl.load(x5_ptr + offs, mask=valid, other=0.0)
    if M > 6:
        v6 = tl.load(x6_ptr + offs, mask=valid, other=0.0)
    if M > 7:
        v7 = tl.load(x7_ptr + offs, mask=valid, other=0.0)
    acc = _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 0, inbox) * v0.to(tl.float32)
    if M > 1:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 1, inbox) * v1.to(tl.float32)
    if M > 2:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 2, inbox) * v2.to(tl.float32)
    if M > 3:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 3, inbox) * v3.to(tl.float32)
    if M > 4:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 4, inbox) * v4.to(tl.float32)
    if M > 5:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 5, inbox) * v5.to(tl.float32)
    if M > 6:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 6, inbox) * v6.to(tl.float32)
    if M > 7:
        acc += _mask_value(coef_in_ptr, coef_out_ptr, batch, b, 7, inbox) * v7.to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _mix_bwd_kernel(
    grad_ptr,
    g0_ptr,
    g1_ptr,
    g2_ptr,
    g3_ptr,
    g4_ptr,
    g5_ptr,
    g6_ptr,
    g7_ptr,
    boxes_ptr,
    coef_in_ptr,
    coef_out_ptr,
    batch,
    n_rows,
    n_cols,
    width,
    channels,
    M: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """g_m = mask_m * grad over one tile: grad is read once, each member gradient written once."""
    b, offs, valid, inbox = _tile_coords(boxes_ptr, n_rows, n_cols, width, channels, CHANNELS_LAST, ROWS, COLS)
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    out_ty = g0_ptr.dtype.element_ty
    tl.store(g0_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 0, inbox) * g).to(out_ty), mask=valid)
    if M > 1:
        tl.store(g1_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 1, inbox) * g).to(out_ty), mask=valid)
    if M > 2:
        tl.store(g2_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 2, inbox) * g).to(out_ty), mask=valid)
    if M > 3:
        tl.store(g3_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 3, inbox) * g).to(out_ty), mask=valid)
    if M > 4:
        tl.store(g4_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 4, inbox) * g).to(out_ty), mask=valid)
    if M > 5:
        tl.store(g5_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 5, inbox) * g).to(out_ty), mask=valid)
    if M > 6:
        tl.store(g6_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 6, inbox) * g).to(out_ty), mask=valid)
    if M > 7:
        tl.store(g7_ptr + offs, (_mask_value(coef_in_ptr, coef_out_ptr, batch, b, 7, inbox) * g).to(out_ty), mask=valid)


# The kernels were built for the CPU interpreter when TRITON_INTERPRET=1 was set before this module was imported.
INTERPRETED = type(_mix_fwd_kernel).__name__ == "InterpretedFunction"


def is_channels_last(x_BCHW: Tensor) -> bool:
    """Whether the kernels treat x as channels_last (NHWC in memory).

    A tensor that is contiguous in both layouts (C == 1 or H == W == 1) has the same offsets either way; it counts
    as NCHW.
    """
    return not x_BCHW.is_contiguous() and x_BCHW.is_contiguous(memory_format=torch.channels_last)


def _on_device(t: Tensor):
    """Make t's GPU the current one for the launch: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _launch(shape_BCHW: Sequence[int], channels_last: bool, elem_bytes: int) -> tuple[int, int, int, int, int]:
    """Tile geometry: (grid size, n_rows, n_cols, ROWS, COLS) of the [n_rows, n_cols] matrices a launch walks."""
    batch, channels, height, width = shape_BCHW
    if channels_last:
        n_outer, n_rows, n_cols = batch, height * width, channels
    else:
        n_outer, n_rows, n_cols = batch * channels, height, width
    # Tile sizes are compile-time constants: int() pins the per-sample sizes (a guard under torch.compile's dynamic
    # shapes); the batch may stay symbolic, it only scales the grid.
    n_rows, n_cols = int(n_rows), int(n_cols)
    cols = min(triton.next_power_of_2(n_cols), _MAX_COLS)
    # Same bytes per tile whatever the dtype: bf16/fp16 tiles hold twice the elements of fp32 ones.
    tile_elems = _TILE_ELEMS * 4 // elem_bytes
    rows = max(1, min(tile_elems // cols, triton.next_power_of_2(n_rows)))
    grid = n_outer * triton.cdiv(n_rows, rows) * triton.cdiv(n_cols, cols)
    return grid, n_rows, n_cols, rows, cols


def _launchable(kernel):
    """The kernel as the op's implementation launches it: through `wrap_triton` on a GPU, so that `triton_op` traces
    it for Inductor; as it is under the interpreter, where the op is an opaque custom op (see `_register`) and torch
    2.11's `wrap_triton` refuses an interpreted kernel (2.14's hands it back unchanged)."""
    return kernel if INTERPRETED else wrap_triton(kernel)


def _mix_fwd(feats: list[Tensor], boxes: Tensor, coef_in: Tensor, coef_out: Tensor) -> Tensor:
    """z [B,C,H,W] = sum_m mask_m * feats[m] (inputs already checked by `mix_features_triton`)."""
    channels_last = is_channels_last(feats[0])
    fmt = _memory_format(channels_last)
    # No-ops when every member is already in the first one's layout (the contract); a copy otherwise.
    xs = [x.contiguous(memory_format=fmt) for x in feats]
    out = torch.empty_like(xs[0], memory_format=fmt)
    if out.numel() == 0:
        return out
    batch, channels, _, width = out.shape
    grid, n_rows, n_cols, rows, cols = _launch(out.shape, channels_last, out.element_size())
    # Unused member slots get a real tensor that the kernel never touches: Inductor has mishandled None pointer
    # arguments of user kernels (pytorch/pytorch#115344, #138546), an alias is always safe.
    ptrs = xs + [xs[0]] * (MAX_MEMBERS - len(xs))
    with _on_device(out):
        _launchable(_mix_fwd_kernel)[(grid,)](
            *ptrs,
            out,
            boxes,
            coef_in,
            coef_out,
            batch,
            n_rows,
            n_cols,
            width,
            channels,
            M=len(xs),
            CHANNELS_LAST=channels_last,
            ROWS=rows,
            COLS=cols,
            num_warps=4,
        )
    return out


def _mix_bwd(grad: Tensor, boxes: Tensor, coef_in: Tensor, coef_out: Tensor) -> list[Tensor]:
    """grad_feats[m] [B,C,H,W] = mask_m * grad, in grad's layout (NCHW unless grad is channels_last)."""
    channels_last = is_channels_last(grad)
    fmt = _memory_format(channels_last)
    grad = grad.contiguous(memory_format=fmt)
    num_members = coef_in.shape[0]
    grads = [torch.empty_like(grad, memory_format=fmt) for _ in range(num_members)]
    if grad.numel() == 0:
        return grads
    batch, channels, _, width = grad.shape
    grid, n_rows, n_cols, rows, cols = _launch(grad.shape, channels_last, grad.element_size())
    ptrs = grads + [grads[0]] * (MAX_MEMBERS - num_members)  # unused slots: an alias never written (see _mix_fwd)
    with _on_device(grad):
        _launchable(_mix_bwd_kernel)[(grid,)](
            grad,
            *ptrs,
            boxes,
            coef_in,
            coef_out,
            batch,
            n_rows,
            n_cols,
            width,
            channels,
            M=num_members,
            CHANNELS_LAST=channels_last,
            ROWS=rows,
            COLS=cols,
            num_warps=4,
        )
    return grads


def _mix_fwd_fake(feats: list[Tensor], boxes: Tensor, coef_in: Tensor, coef_out: Tensor) -> Tensor:
    return torch.empty_like(feats[0], memory_format=_memory_format(is_channels_last(feats[0])))


def _mix_bwd_fake(grad: Tensor, boxes: Tensor, coef_in: Tensor, coef_out: Tensor) -> list[Tensor]:
    fmt = _memory_format(is_channels_last(grad))
    return [torch.empty_like(grad, memory_format=fmt) for _ in range(coef_in.shape[0])]


def _register(name: str, schema: str, impl, fake) -> None:
    """Define op `name` backed by the Triton kernels of `impl`.

    On a GPU: `triton_op`, whose fake kernel is `impl` itself traced through `wrap_triton`, so Inductor sees and
    can fuse around the kernels. Under the interpreter `wrap_triton` hands back the raw kernel, which a fake or
    functionalised trace would run on fake tensors (or drop from the graph): there the op is an opaque `custom_op`
    with an explicit fake kernel, which keeps eager mode and torch.compile correct on CPU tensors.
    """
    if INTERPRETED:
        torch.library.custom_op(name, impl, mutates_args=(), schema=schema).register_fake(fake)
    else:
        triton_op(name, impl, mutates_args=(), schema=schema)


_register(
    "mixmo::mix_fwd",
    "(Tensor[] feats, Tensor boxes, Tensor coef_in, Tensor coef_out) -> Tensor",
    _mix_fwd,
    _mix_fwd_fake,
)
_register(
    "mixmo::mix_bwd",
    "(Tensor grad, Tensor boxes, Tensor coef_in, Tensor coef_out) -> Tensor[]",
    _mix_bwd,
    _mix_bwd_fake,
)


def _setup_context(ctx, inputs, output) -> None:
    _, boxes, coef_in, coef_out = inputs
    ctx.save_for_backward(boxes, coef_in, coef_out)
    ctx.channels_last = is_channels_last(output)


def _backward(ctx, grad_z: Tensor):
    boxes, coef_in, coef_out = ctx.saved_tensors
    # Autograd may hand over any strides (an expanded grad of a sum, say): give the kernel the forward's layout.
    grad_z = grad_z.contiguous(memory_format=_memory_format(ctx.channels_last))
    grads = torch.ops.mixmo.mix_bwd(grad_z, boxes, coef_in, coef_out)
    # Boxes and coefficients are sampled constants: no gradient.
    return list(grads), None, None, None


torch.library.register_autograd("mixmo::mix_fwd", _backward, setup_context=_setup_context)


def supports(feats: Sequence[Tensor]) -> bool:
    """Whether the kernels take these member maps (for a dispatcher choosing between them and the torch path)."""
    return (
        0 < len(feats) <= MAX_MEMBERS
        and feats[0].dim() == 4
        and feats[0].dtype in _DTYPES
        and (feats[0].is_cuda or INTERPRETED)
    )


def _check_inputs(feats: Sequence[Tensor], boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor) -> None:
    """Raise TypeError/ValueError naming the argument that breaks the contract of `mix_features_triton`."""
    if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
        raise TypeError(f"feats must be a sequence of M tensors [B,C,H,W], got {type(feats).__name__}")
    num_members = len(feats)
    if not 1 <= num_members <= MAX_MEMBERS:
        raise ValueError(f"feats must hold 1 to {MAX_MEMBERS} members for the Triton kernel, got {num_members}")
    for name, t in [*((f"feats[{m}]", x) for m, x in enumerate(feats)), ("boxes_B4", boxes_B4),
                    ("coef_in_MB", coef_in_MB), ("coef_out_MB", coef_out_MB)]:  # fmt: skip
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first = feats[0]
    if first.dim() != 4:
        raise ValueError(f"feats[0] must be [B,C,H,W], got shape {tuple(first.shape)}")
    if first.dtype not in _DTYPES:
        raise TypeError(f"feats[0] has dtype {first.dtype}; the Triton kernel takes float32, bfloat16 or float16")
    for m, x in enumerate(feats[1:], start=1):
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"feats[{m}] is {tuple(x.shape)} {x.dtype} on {x.device}, but feats[0] is "
                f"{tuple(first.shape)} {first.dtype} on {first.device}: members must match"
            )
    batch = first.shape[0]
    if boxes_B4.shape != (batch, 4) or boxes_B4.dtype.is_floating_point or boxes_B4.dtype == torch.bool:
        raise ValueError(
            f"boxes_B4 must be an integer tensor [{batch},4], got {boxes_B4.dtype} {tuple(boxes_B4.shape)}"
        )
    for name, coef in (("coef_in_MB", coef_in_MB), ("coef_out_MB", coef_out_MB)):
        if coef.shape != (num_members, batch) or not coef.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a float tensor [{num_members},{batch}], got {coef.dtype} {tuple(coef.shape)}"
            )
    for name, t in (("boxes_B4", boxes_B4), ("coef_in_MB", coef_in_MB), ("coef_out_MB", coef_out_MB)):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but feats are on {first.device}")
    if first.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"feats[0] is on {first.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")


def mix_features_triton(feats: Sequence[Tensor], boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor) -> Tensor:
    """The fused mixing block: z = sum_m mask_m * feats[m], masks recomputed from the boxes inside the kernel.

    Args:
        feats: M (1 to 8) maps [B,C,H,W] of one dtype (float32, bfloat16 or float16), all NCHW-contiguous or all
            channels_last, on CUDA (or CPU under TRITON_INTERPRET=1).
        boxes_B4: integer [B,4] boxes (y0, y1, x0, x1), half-open; empty or out-of-map boxes are fine.
        coef_in_MB: float [M,B] member m's mask value inside sample b's box.
        coef_out_MB: float [M,B] member m's mask value outside it.
    Returns:
        z [B,C,H,W] in the members' dtype and layout, accumulated in float32. Differentiable with respect to `feats`
        (grad_feats[m] = mask_m * grad_z); boxes and coefficients get no gradient.
    """
    _check_inputs(feats, boxes_B4, coef_in_MB, coef_out_MB)
    return torch.ops.mixmo.mix_fwd(
        list(feats),
        boxes_B4.to(torch.int64).contiguous(),
        coef_in_MB.to(torch.float32).contiguous(),
        coef_out_MB.to(torch.float32).contiguous(),
    )
