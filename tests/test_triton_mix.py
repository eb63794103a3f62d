"""Tests of the fused Triton mask-and-mix kernel without a GPU.

The kernels run on CPU tensors through Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
`mixmo_dist.ops.triton_mix` is imported. Setting it in this process would also turn the kernels of the GPU tests
(collected in the same pytest run) into interpreted ones, so the interpreter checks run in one subprocess: this
file run as a script computes every check and prints a JSON report, and the tests below assert on its numbers.
The tests in this process (input validation, the `triton_op` trace that Inductor sees) use the real, compiled kernels'
registration and never launch them.

Reference: a float64 loop over samples that materialises each mask with slicing, independent of the vectorised torch
path (which is also compared, as the dispatcher must give the same answer on either path).
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# (M, dtype, channels_last, mixing, small tiles). Shape B=3, C=5, H=7, W=9: no side is a power of two, so every tile
# has masked lanes. The full sweep runs with the default tiles (one masked tile per plane at this size); "small tiles"
# cases shrink the tile so a plane spans several row and column blocks, each direction with a partial last block.
SWEEP = [
    (m, dtype, cl, mixing, False)
    for m in (2, 3)
    for dtype in ("float32", "bfloat16")
    for cl in (False, True)
    for mixing in ("cut", "linear")
]
SMALL_TILES = [
    (2, "float32", False, "cut", True),
    (2, "float32", True, "cut", True),
    (3, "bfloat16", False, "linear", True),
    (3, "bfloat16", True, "linear", True),
    (8, "float32", True, "cut", True),
]
EXTRA = [
    (8, "float32", False, "linear", False),
    (2, "float16", True, "cut", False),
    (3, "float16", False, "cut", False),
]
CASES = SWEEP + SMALL_TILES + EXTRA
# (M, dtype, channels_last) with B = 16 boxes whose four edges all lie strictly inside the 7x9 map (plus the three
# edge-case boxes): an off-by-one in any comparison of the in-box test changes a row or column of every such box. The
# cases above cannot see one: B=3 and all three boxes are edge cases (full map, empty, touching two borders).
INTERIOR = [
    (2, "float32", False),
    (2, "float32", True),
    (3, "bfloat16", True),
]
_INTERIOR_BOXES = 16


def _case_name(m: int, dtype: str, cl: bool, mixing: str, small: bool) -> str:
    return f"M{m}-{dtype}-{'nhwc' if cl else 'nchw'}-{mixing}-{'small' if small else 'default'}"


def _interior_name(m: int, dtype: str, cl: bool) -> str:
    return f"M{m}-{dtype}-{'nhwc' if cl else 'nchw'}-interior"


# ----------------------------------------------------------------------------------------------------------------
# Worker: runs under TRITON_INTERPRET=1 in a subprocess and prints one JSON report.
# ----------------------------------------------------------------------------------------------------------------


def _reference(feats, boxes_B4, coef_in_MB, coef_out_MB, grad_z):
    """float64 z and member gradients from explicitly materialised masks (one slice assignment per sample)."""
    num_members = len(feats)
    batch, _, height, width = feats[0].shape
    masks_MBHW = torch.empty(num_members, batch, height, width, dtype=torch.float64)
    for b in range(batch):
        y0, y1, x0, x1 = (int(v) for v in boxes_B4[b])
        inbox_HW = torch.zeros(height, width, dtype=torch.bool)
        inbox_HW[y0:y1, x0:x1] = True  # an inverted or empty box gives an empty slice, as the half-open test does
        for m in range(num_members):
            masks_MBHW[m, b] = torch.where(inbox_HW, coef_in_MB[m, b].double(), coef_out_MB[m, b].double())
    z = sum(masks_MBHW[m][:, None] * feats[m].double() for m in range(num_members))
    grads = [masks_MBHW[m][:, None] * grad_z.double() for m in range(num_members)]
    return z, grads


def _err_ratio(out, ref, dtype) -> float:
    """max |out - ref| / tolerance; <= 1 passes. Tolerance: one rounding of the fp32 accumulator to `dtype`.

    Triton's interpreter converts float32 to bfloat16 by truncation (seen with Triton 3.8: 1 + 0.9 * 2**-7 becomes
    1.0), up to one unit in the last place where a GPU rounds to nearest (half a unit): allow the full unit.
    """
    rel = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    tol = 1e-6 + rel * ref.abs()
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float(((out - ref).abs() / tol).max())


def _boxes_with_edge_cases(mix, height, width):
    """The sampler's boxes with sample 0 covering the whole map and sample 1 empty (an inverted box, y0 > y1)."""
    boxes_B4 = mix.boxes_B4.clone()
    boxes_B4[0] = torch.tensor([0, height, 0, width])
    boxes_B4[1] = torch.tensor([height - 1, 2, 3, width])
    boxes_B4[2] = torch.tensor([0, 3, width - 4, width])  # touches the top and right edges
    return boxes_B4


def _run_case(tm, mixing_mod, m, dtype_name, cl, mixing, small, generator):
    dtype = getattr(torch, dtype_name)
    batch, channels, height, width = 3, 5, 7, 9
    # Small tiles (16 fp32 elements, at most 4 columns): several row and column blocks per plane, each direction
    # with a partial last block. The defaults give one (masked) tile per plane at this size.
    tm._TILE_ELEMS, tm._MAX_COLS = (16, 4) if small else (2048, 256)
    mix = mixing_mod.sample_mixing(
        batch, m, height, width, mixing=mixing, alpha=2.0, cut_prob=1.0, generator=generator, device="cpu"
    )
    boxes_B4 = _boxes_with_edge_cases(mix, height, width)
    fmt = torch.channels_last if cl else torch.contiguous_format
    feats = [
        torch.randn(batch, channels, height, width, generator=generator).to(dtype).contiguous(memory_format=fmt)
        for _ in range(m)
    ]
    leaves = [x.clone().requires_grad_(True) for x in feats]
    grad_z = torch.randn(batch, channels, height, width, generator=generator).to(dtype).contiguous(memory_format=fmt)
    z = tm.mix_features_triton(leaves, boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    grads = torch.autograd.grad(z, leaves, grad_z)
    z_ref, grads_ref = _reference(feats, boxes_B4, mix.coef_in_MB, mix.coef_out_MB, grad_z)
    # The vectorised torch path in float32 on the same (rounded) inputs: the dispatcher's other branch.
    z_torch = mixing_mod.mix_features_torch([x.float() for x in feats], boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    return {
        "fwd": _err_ratio(z, z_ref, dtype),
        "bwd": max(_err_ratio(g, r, dtype) for g, r in zip(grads, grads_ref)),
        "vs_torch": _err_ratio(z, z_torch.double(), dtype),
        "out_dtype_ok": z.dtype == dtype and all(g.dtype == dtype for g in grads),
        "out_layout_ok": z.is_contiguous(memory_format=fmt) and all(g.is_contiguous(memory_format=fmt) for g in grads),
        "ref_nonzero": float(z_ref.abs().mean()),
    }


def _interior_boxes(count: int, height: int, width: int, generator) -> torch.Tensor:
    """int64 [count,4] random boxes (y0, y1, x0, x1) with 0 < y0 < y1 < H and 0 < x0 < x1 < W."""
    rows = []
    for _ in range(count):
        y0 = int(torch.randint(1, height - 1, (), generator=generator))
        y1 = int(torch.randint(y0 + 1, height, (), generator=generator))
        x0 = int(torch.randint(1, width - 1, (), generator=generator))
        x1 = int(torch.randint(x0 + 1, width, (), generator=generator))
        rows.append([y0, y1, x0, x1])
    return torch.tensor(rows, dtype=torch.int64)


def _run_interior_case(tm, m, dtype_name, cl, generator):
    """Edge-case boxes plus 16 interior ones, random coefficients (inside != outside), default tiles.

    Besides the kernel's error it reports, per box edge and direction, the error that a reference with that edge
    moved by one would have: each must exceed the tolerance, so the case can see every off-by-one in the box test.
    """
    dtype = getattr(torch, dtype_name)
    height, width, channels = 7, 9, 2
    tm._TILE_ELEMS, tm._MAX_COLS = 2048, 256
    edge = torch.tensor([[0, height, 0, width], [height - 1, 2, 3, width], [0, 3, width - 4, width]])
    boxes_B4 = torch.cat([edge, _interior_boxes(_INTERIOR_BOXES, height, width, generator)])
    batch = boxes_B4.shape[0]
    coef_in_MB = torch.rand(m, batch, generator=generator) + 0.5
    coef_out_MB = torch.rand(m, batch, generator=generator) - 1.5  # never equal to coef_in: every edge shows
    fmt = torch.channels_last if cl else torch.contiguous_format
    feats = [
        torch.randn(batch, channels, height, width, generator=generator).to(dtype).contiguous(memory_format=fmt)
        for _ in range(m)
    ]
    leaves = [x.clone().requires_grad_(True) for x in feats]
    grad_z = torch.randn(batch, channels, height, width, generator=generator).to(dtype).contiguous(memory_format=fmt)
    z = tm.mix_features_triton(leaves, boxes_B4, coef_in_MB, coef_out_MB)
    grads = torch.autograd.grad(z, leaves, grad_z)
    z_ref, grads_ref = _reference(feats, boxes_B4, coef_in_MB, coef_out_MB, grad_z)
    moved = {}
    for col, edge_name in enumerate(("y0", "y1", "x0", "x1")):
        for shift in (-1, 1):
            shifted = boxes_B4.clone()
            shifted[3:, col] += shift  # interior boxes only: the edge cases stay put
            z_moved, _ = _reference(feats, shifted, coef_in_MB, coef_out_MB, grad_z)
            moved[f"{edge_name}{shift:+d}"] = _err_ratio(z_moved, z_ref, dtype)
    interior = boxes_B4[3:]
    return {
        "fwd": _err_ratio(z, z_ref, dtype),
        "bwd": max(_err_ratio(g, r, dtype) for g, r in zip(grads, grads_ref)),
        "batch": batch,
        "strictly_inside": bool(
            ((interior[:, 0] > 0) & (interior[:, 1] < height) & (interior[:, 2] > 0) & (interior[:, 3] < width)).all()
        ),
        "moved_edge_err": moved,
        "out_layout_ok": z.is_contiguous(memory_format=fmt) and all(g.is_contiguous(memory_format=fmt) for g in grads),
    }


def _compile_checks(tm, mixing_mod, generator):
    """torch.compile(fullgraph) of a function around the op, forward and backward, against eager."""
    batch, channels, height, width = 2, 3, 6, 5
    mix = mixing_mod.sample_mixing(
        batch, 3, height, width, mixing="cut", alpha=2.0, cut_prob=1.0, generator=generator, device="cpu"
    )
    feats = [torch.randn(batch, channels, height, width, generator=generator) for _ in range(3)]

    def step(a, b, c, boxes_B4, coef_in_MB, coef_out_MB):
        z = tm.mix_features_triton([a * 2.0, b, c.relu()], boxes_B4, coef_in_MB, coef_out_MB)
        return (z.sin() * 3.0).sum()

    results = {}
    leaves = [x.clone().requires_grad_(True) for x in feats]
    loss_ref = step(*leaves, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        leaves = [x.clone().requires_grad_(True) for x in feats]
        loss = compiled(*leaves, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        grads = torch.autograd.grad(loss, leaves)
        results[backend] = {
            "fwd": abs(float(loss - loss_ref)) / (1e-5 * abs(float(loss_ref)) + 1e-5),
            "bwd": max(float((g - r).abs().max()) / 1e-5 for g, r in zip(grads, grads_ref)),
        }
    return results


def _misc_checks(tm, mixing_mod, generator):
    """Edge cases off the main sweep: empty batch, mixed layouts, an expanded grad_z, constants without gradient."""
    shape = (2, 3, 5, 6)
    mix = mixing_mod.sample_mixing(2, 2, 5, 6, mixing="cut", alpha=2.0, cut_prob=1.0, generator=generator, device="cpu")
    a = torch.randn(shape, generator=generator)
    b = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
    leaves = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    coef_in = mix.coef_in_MB.clone().requires_grad_(True)
    z = tm.mix_features_triton(leaves, mix.boxes_B4, coef_in, mix.coef_out_MB)
    z.sum().backward()  # grad_z is a stride-0 expanded tensor
    ones = torch.ones(shape)
    z_ref, grads_ref = _reference([a, b], mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB, ones)
    empty = tm.mix_features_triton(
        [torch.randn(0, 3, 5, 6), torch.randn(0, 3, 5, 6)],
        mix.boxes_B4[:0],
        mix.coef_in_MB[:, :0],
        mix.coef_out_MB[:, :0],
    )
    return {
        "mixed_layouts_fwd": _err_ratio(z, z_ref, torch.float32),
        "mixed_layouts_nchw_out": z.is_contiguous(),
        "expanded_grad_bwd": max(_err_ratio(x.grad, r, torch.float32) for x, r in zip(leaves, grads_ref)),
        "coef_grad_is_none": coef_in.grad is None,
        "empty_shape": list(empty.shape),
    }


def _worker() -> None:
    torch.set_num_threads(1)
    from mixmo_dist.ops import mixing as mixing_mod
    from mixmo_dist.ops import triton_mix as tm

    generator = torch.Generator().manual_seed(1234)
    import triton

    report = {"interpreted": tm.INTERPRETED, "triton": triton.__version__, "cases": {}}
    for case in CASES:
        report["cases"][_case_name(*case)] = _run_case(tm, mixing_mod, *case, generator)
    report["interior"] = {_interior_name(*case): _run_interior_case(tm, *case, generator) for case in INTERIOR}
    report["misc"] = _misc_checks(tm, mixing_mod, generator)
    report["compile"] = _compile_checks(tm, mixing_mod, generator)
    print("REPORT " + json.dumps(report))


# ----------------------------------------------------------------------------------------------------------------
# Tests (this process): assert on the worker's report, plus checks that need no kernel launch.
# ----------------------------------------------------------------------------------------------------------------


# The lent GPU machines run Triton 3.6 and this venv 3.8: the kernels must work on both. `make test` installs 3.6
# (no dependencies) into this folder; the interpreter checks then run once per version.
TRITON_OLD = ROOT / ".venv" / "triton-3.6"


@pytest.fixture(scope="module", params=["venv", "3.6"], ids=["triton-venv", "triton-3.6"])
def report(request) -> dict:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if request.param == "3.6":
        if not (TRITON_OLD / "triton" / "__init__.py").is_file():
            pytest.skip(f"Triton 3.6 is not installed in {TRITON_OLD} (make test installs it)")
        paths.insert(1, str(TRITON_OLD))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("REPORT ") :])
    if request.param == "3.6":
        assert result["triton"].startswith("3.6."), f"the worker imported Triton {result['triton']}, not 3.6"
    return result


def test_worker_ran_the_interpreter(report):
    assert report["interpreted"] is True
    assert set(report["cases"]) == {_case_name(*case) for case in CASES}
    assert set(report["interior"]) == {_interior_name(*case) for case in INTERIOR}


@pytest.mark.parametrize("case", CASES, ids=[_case_name(*case) for case in CASES])
def test_kernel_matches_reference(report, case):
    res = report["cases"][_case_name(*case)]
    assert res["ref_nonzero"] > 0.1  # the inputs were random, not zeros that would hide unwritten outputs
    assert res["fwd"] <= 1.0, f"forward error {res['fwd']:.3g} x tolerance"
    assert res["bwd"] <= 1.0, f"backward error {res['bwd']:.3g} x tolerance"
    assert res["vs_torch"] <= 1.0, f"differs from mix_features_torch by {res['vs_torch']:.3g} x tolerance"
    assert res["out_dtype_ok"], "z or a gradient came back in another dtype"
    assert res["out_layout_ok"], "z or a gradient came back in another memory format"


@pytest.mark.parametrize("case", INTERIOR, ids=[_interior_name(*case) for case in INTERIOR])
def test_kernel_matches_reference_on_boxes_inside_the_map(report, case):
    """16 random boxes with every edge strictly inside the map (plus the edge cases), NCHW and channels_last."""
    res = report["interior"][_interior_name(*case)]
    assert res["batch"] >= 16 and res["strictly_inside"], res
    # The data can see an off-by-one on each edge, either way: a reference with that edge moved fails the tolerance.
    assert min(res["moved_edge_err"].values()) > 10.0, res["moved_edge_err"]
    assert res["fwd"] <= 1.0, f"forward error {res['fwd']:.3g} x tolerance"
    assert res["bwd"] <= 1.0, f"backward error {res['bwd']:.3g} x tolerance"
    assert res["out_layout_ok"], "z or a gradient came back in another memory format"


def test_edge_cases(report):
    misc = report["misc"]
    assert misc["mixed_layouts_fwd"] <= 1.0 and misc["mixed_layouts_nchw_out"], misc  # follows feats[0]'s layout
    assert misc["expanded_grad_bwd"] <= 1.0, misc
    assert misc["coef_grad_is_none"], "a coefficient received a gradient"
    assert misc["empty_shape"] == [0, 3, 5, 6]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(report, backend):
    res = report["compile"][backend]
    assert res["fwd"] <= 1.0 and res["bwd"] <= 1.0, res


@pytest.fixture(scope="module")
def tm():
    """The kernel module as a GPU run imports it (compiled kernels, `triton_op` registration); nothing is launched."""
    from mixmo_dist.ops import triton_mix

    return triton_mix


def _valid_args(members: int = 2, device: str = "cpu"):
    feats = [torch.randn(2, 3, 4, 5, device=device) for _ in range(members)]
    boxes_B4 = torch.tensor([[0, 2, 1, 4], [1, 1, 0, 5]], device=device)
    coef_MB = torch.full((members, 2), 1.0 / members, device=device)
    return feats, boxes_B4, coef_MB, coef_MB.clone()


@pytest.mark.parametrize(
    "breakage, error, culprit",
    [
        (lambda a: (a[0][0], *a[1:]), TypeError, "feats must be a sequence"),
        (lambda a: (a[0] * 5, *a[1:]), ValueError, "1 to 8"),
        (lambda a: ([a[0][0], a[0][1][:, :2]], *a[1:]), ValueError, "feats[1]"),
        (lambda a: ([x.double() for x in a[0]], *a[1:]), TypeError, "float64"),
        (lambda a: ([x[0] for x in a[0]], *a[1:]), ValueError, "feats[0] must be [B,C,H,W]"),
        (lambda a: (a[0], a[1][:, :3], a[2], a[3]), ValueError, "boxes_B4"),
        (lambda a: (a[0], a[1].float(), a[2], a[3]), ValueError, "boxes_B4"),
        (lambda a: (a[0], a[1], a[2][:1], a[3]), ValueError, "coef_in_MB"),
        (lambda a: (a[0], a[1], a[2], a[3].long()), ValueError, "coef_out_MB"),
        (lambda a: (a[0], a[1], a[2], [0.5]), TypeError, "coef_out_MB"),
    ],
    ids=[
        "tensor-not-list",
        "9-members",
        "shape",
        "float64",
        "3d",
        "boxes-shape",
        "boxes-float",
        "coef-shape",
        "coef-int",
        "coef-list",
    ],  # fmt: skip
)
def test_bad_input_names_the_culprit(tm, breakage, error, culprit):
    """Each broken argument raises before any launch, naming itself (the valid arguments pass this stage)."""
    with pytest.raises(error, match=re.escape(culprit)):
        tm.mix_features_triton(*breakage(_valid_args()))


def test_cpu_tensors_need_cuda_or_the_interpreter(tm):
    if tm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: CPU tensors are valid here")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        tm.mix_features_triton(*_valid_args())


def test_supports_tells_the_dispatcher_what_the_kernels_take(tm):
    feats = _valid_args()[0]
    assert tm.supports(feats) is tm.INTERPRETED  # CPU tensors: only under the interpreter
    assert not tm.supports([x.double() for x in feats])
    assert not tm.supports(feats * 5)
    assert not tm.supports([x[0] for x in feats])


def test_triton_op_trace_exposes_the_kernels(tm):
    """What torch.compile sees on a GPU: AOTAutograd decomposes the ops into the two Triton kernels.

    The trace runs on fake tensors, so no GPU is needed; Triton's mutation analysis needs a driver and falls back to
    "every argument may be written" here (harmless clones in this graph, not on a GPU).
    """
    if tm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process: the ops are opaque custom ops")
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, _inputs):
        graphs.append(gm)

        def stop(*_args):
            raise Captured  # running the graph would launch the kernels, which needs a GPU

        return stop

    feats, boxes_B4, coef_in_MB, coef_out_MB = _valid_args(members=3)
    feats = [x.contiguous(memory_format=torch.channels_last).requires_grad_(True) for x in feats]
    fn = aot_function(lambda a, b, c, *consts: torch.ops.mixmo.mix_fwd([a, b, c], *consts), capture)
    with pytest.raises(Captured):
        fn(*feats, boxes_B4, coef_in_MB, coef_out_MB)

    def kernels(gm):
        calls = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        # Launch options (num_warps) make torch wrap the kernel in a one-config Autotuner.
        found = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in calls]
        return [k.fn if isinstance(k, Autotuner) else k for k in found], calls

    fwd_kernels, fwd_calls = kernels(graphs[0])
    assert fwd_kernels == [tm._mix_fwd_kernel]
    launch = fwd_calls[0].kwargs["kwargs"]
    assert (launch["M"], launch["CHANNELS_LAST"], launch["n_rows"], launch["n_cols"]) == (3, True, 20, 3)
    # The backward op on its own (the registered autograd formula calls it), through the same capturing compiler.
    bwd = aot_function(torch.ops.mixmo.mix_bwd, capture)
    with pytest.raises(Captured):
        bwd(torch.randn(2, 3, 4, 5), boxes_B4, coef_in_MB, coef_out_MB)
    bwd_kernels, bwd_calls = kernels(graphs[-1])
    assert bwd_kernels == [tm._mix_bwd_kernel]
    assert bwd_calls[0].kwargs["kwargs"]["M"] == 3 and bwd_calls[0].kwargs["kwargs"]["CHANNELS_LAST"] is False


def test_package_imports_and_mixes_without_triton():
    """`import mixmo_dist.ops` and the torch path work where Triton is missing; the kernel module fails to import."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from mixmo_dist.ops import mix_features\n"
        "feats = [torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)]\n"
        "coef_in, coef_out = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])\n"
        "z = mix_features(feats, torch.tensor([[0, 1, 0, 3]]), coef_in, coef_out)\n"
        "assert z[0, :, 0].eq(1).all() and z[0, :, 1:].eq(0).all(), z\n"
        "try:\n"
        "    import mixmo_dist.ops.triton_mix\n"
        "except ImportError:\n"
        "    print('NO-TRITON-OK')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "NO-TRITON-OK" in proc.stdout, proc.stderr[-3000:]


if __name__ == "__main__":
    _worker()
