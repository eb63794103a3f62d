"""GPU checks (marked `gpu`, skipped without CUDA): the Triton kernel, sync-free sampling, AMP steps, NCCL, SyncBN,
compile.

Run on a lent GPU machine by `scripts/gpu_check.sh` (`make gpu-check`). They need torch, Triton, timm and pyyaml (no
DALI, no submitit). The last test is not GPU-marked: it smoke-runs the GPU benchmark on CPU so the runbook's script
cannot rot between GPU sessions.
"""

import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from mixmo_dist.ops import mixing
from mixmo_dist.ops.mixing import member_masks, mix_features, sample_mixing

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# Relative tolerance of one round-to-nearest of the float32 accumulator into each dtype (plus float32 arithmetic).
_REL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _poison(shape, dtype, count: int) -> None:
    """Fill and free `count` blocks of the size the next allocations will ask for, so that the caching allocator
    hands NaN-filled memory to the kernel's outputs: an element the kernel fails to write stays NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for _ in range(count)]
    del blocks


def _reference(feats, mix, grad_z):
    """float64 z and member gradients from the materialised masks."""
    height, width = feats[0].shape[-2:]
    masks_MB1HW = member_masks(mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB, height, width).double()
    z = sum(masks_MB1HW[m] * x.double() for m, x in enumerate(feats))
    return z, [masks_MB1HW[m] * grad_z.double() for m in range(len(feats))]


def _assert_close(out, ref, dtype, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten element stays NaN)"
    err = (out.detach().double() - ref).abs()
    tol = 1e-6 + _REL[dtype] * ref.abs()
    worst = float((err / tol).max())
    assert worst <= 1.0, f"{what}: error {worst:.3g} x tolerance"


_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
# (shape, dtype, channels_last, members, mixing). Every dtype x layout x M at the ResNet-50 stem's size, a few at an odd
# size (no side a power of two; one masked tile per plane). Each new combination compiles two kernels (about a
# second each on a cold machine), so the odd size does not repeat the whole product.
KERNEL_CASES = [
    ((8, 64, 112, 112), dtype, cl, m, "cut" if m == 2 else "linear")
    for dtype in (_F32, _BF16, _F16)
    for cl in (False, True)
    for m in (2, 3)
] + [
    ((5, 7, 13, 11), _F32, False, 2, "cut"),
    ((5, 7, 13, 11), _BF16, True, 3, "linear"),
    ((5, 7, 13, 11), _F16, False, 3, "cut"),
    ((5, 7, 13, 11), _BF16, False, 2, "linear"),
    ((3, 300, 9, 7), _F32, True, 2, "cut"),  # C > 256: several channel blocks per pixel row
]


def _kernel_case_id(case) -> str:
    shape, dtype, cl, m, mode = case
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'nhwc' if cl else 'nchw'}-M{m}-{mode}"


@pytest.mark.parametrize(
    "shape, dtype, channels_last, members, mixing_mode", KERNEL_CASES, ids=[_kernel_case_id(c) for c in KERNEL_CASES]
)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_kernel_matches_reference(shape, dtype, channels_last, members, mixing_mode):
    generator = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((members, shape, mixing_mode)).encode()))
    batch, _, height, width = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mix = sample_mixing(
        batch, members, height, width, mixing=mixing_mode, alpha=2.0, cut_prob=1.0, generator=generator, device="cuda"
    )
    feats = [
        torch.randn(shape, generator=generator, device="cuda").to(dtype).contiguous(memory_format=fmt)
        for _ in range(members)
    ]
    grad_z = torch.randn(shape, generator=generator, device="cuda").to(dtype).contiguous(memory_format=fmt)
    leaves = [x.clone().requires_grad_(True) for x in feats]
    assert mixing._triton_usable(leaves), "the dispatcher would not take the Triton path on CUDA"
    _poison(shape, dtype, count=members + 1)
    z = mix_features(leaves, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    _poison(shape, dtype, count=members + 1)
    grads = torch.autograd.grad(z, leaves, grad_z)
    z_ref, grads_ref = _reference(feats, mix, grad_z)
    _assert_close(z, z_ref, dtype, "forward")
    for m, (g, r) in enumerate(zip(grads, grads_ref)):
        _assert_close(g, r, dtype, f"grad of member {m}")
    for t in (z, *grads):
        assert t.dtype == dtype and t.is_contiguous(memory_format=fmt)
    # Same answer as the vectorised torch path (the dispatcher's other branch) on the same inputs upcast to float32:
    # in bf16/fp16 the torch path rounds the masks and its intermediate, the kernel only its result.
    z_torch = mixing.mix_features_torch([x.float() for x in feats], mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    _assert_close(z, z_torch.double(), dtype, "forward vs mix_features_torch")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_kernel_offsets_past_2_31():
    """More than 2**31 elements: the last sample sits past int32 offsets (the kernel's base offset is int64)."""
    channels, height, width = 64, 112, 112
    batch = 2**31 // (channels * height * width) + 2
    free, _ = torch.cuda.mem_get_info()
    need = 6 * batch * channels * height * width * 2  # 2 members, z, grad_z, 2 grads in bf16
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    generator = torch.Generator(device="cuda").manual_seed(7)
    mix = sample_mixing(
        batch, 2, height, width, mixing="cut", alpha=2.0, cut_prob=1.0, generator=generator, device="cuda"
    )
    # The last 3 samples: one straddles offset 2**31, two lie wholly past it. Only they get values (the rest of
    # the maps is left uninitialised: its outputs are not checked).
    tail = slice(batch - 3, batch)
    feats = [torch.empty(batch, channels, height, width, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    for x in feats:
        x[tail].normal_(generator=generator)
    leaves = [x.requires_grad_(True) for x in feats]
    z = mix_features(leaves, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    grad_z = torch.zeros_like(z)
    grad_z[tail].normal_(generator=generator)
    grads = torch.autograd.grad(z, leaves, grad_z)
    sub_mix = mixing.MixParams(
        mix.boxes_B4[tail], mix.coef_in_MB[:, tail], mix.coef_out_MB[:, tail], mix.lam_MB[:, tail], mix.is_cut, 1.0
    )
    z_ref, grads_ref = _reference([x[tail].detach() for x in feats], sub_mix, grad_z[tail])
    _assert_close(z[tail].detach(), z_ref, torch.bfloat16, "forward, samples past 2**31")
    for g, r in zip(grads, grads_ref):
        _assert_close(g[tail], r, torch.bfloat16, "backward, samples past 2**31")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_mixing_step_never_syncs_with_the_host():
    """Sampler, member inputs, the Triton mixing forward/backward and the loss run with sync debug mode = error."""
    from mixmo_dist.training.loss import mixmo_loss, reweight
    from mixmo_dist.training.members import member_inputs

    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (4,), device="cuda")
    feats = [torch.randn(8, 16, 8, 8, device="cuda", requires_grad=True) for _ in range(3)]
    head = torch.randn(16, 5, device="cuda")

    def step(mixing_mode: str, members: int):
        x, y = member_inputs(images, labels, num_members=members, repetitions=2, input_repetition=0.5,
                             generator=generator)  # fmt: skip
        mix = sample_mixing(8, members, 8, 8, mixing=mixing_mode, alpha=2.0, cut_prob=0.5, generator=generator,
                            device="cuda")  # fmt: skip
        z = mix_features(feats[:members], mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        logits = (z.mean((2, 3)) @ head).expand(members, -1, -1)
        loss, _ = mixmo_loss(logits, y, reweight(mix.lam_MB, 3.0))
        loss.backward()
        return x, mix, loss

    step("cut", 2)  # warm-up outside the checked region: Triton compiles and loads its kernels here
    step("cut", 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(mode, m) for mode in ("cut", "linear", "none") for m in (2, 3) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for x, mix, loss in results:
        assert x.is_cuda and mix.boxes_B4.is_cuda and mix.lam_MB.is_cuda
        assert torch.allclose(mix.lam_MB.sum(0), torch.ones_like(mix.lam_MB[0]), atol=1e-5)
        assert torch.isfinite(loss)
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16-gradscaler", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_amp_train_steps_channels_last(dtype):
    """A small MixMo network learns a fixed batch under AMP (fp16 through a GradScaler), channels_last throughout."""
    from mixmo_dist.model import build_model
    from mixmo_dist.training.loss import mixmo_loss, reweight

    torch.manual_seed(0)
    model = build_model("resnet18", 2, 10).cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    y = torch.randint(0, 10, (2, 16), device="cuda")
    height, width = model.encoder_output_hw(64, 64)
    mix = sample_mixing(16, 2, height, width, mixing="cut", alpha=2.0, cut_prob=1.0, generator=generator,
                        device="cuda")  # fmt: skip
    mixed = {}
    # The first conv inside the core is an Identity now: its input is the mixed map z.
    stem = model.core.get_submodule(model.first_conv_name)
    hook = stem.register_forward_pre_hook(lambda _m, args: mixed.update(z=args[0]))
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x, mix)
        loss, _ = mixmo_loss(logits, y, reweight(mix.lam_MB, 3.0))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    hook.remove()
    assert logits.dtype == dtype
    assert mixed["z"].dtype == dtype and mixed["z"].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if dtype == torch.float16:
        assert 0 < scaler.get_scale() < float("inf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_single_process_nccl_world():
    """init_process_group("nccl") with world size 1, then the collectives the trainer uses."""
    import torch.distributed as dist

    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        t = torch.arange(5, dtype=torch.float32, device="cuda")
        dist.all_reduce(t)
        flags = torch.tensor([0.0, 1.0, 0.0], device="cuda")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        gathered = [torch.empty(3, device="cuda")]
        dist.all_gather(gathered, flags)
        obj = [{"step": 3}]
        dist.broadcast_object_list(obj, src=0)
        dist.barrier()
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert flags.tolist() == [0.0, 1.0, 0.0] and gathered[0].tolist() == [0.0, 1.0, 0.0]
        assert obj == [{"step": 3}]
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_one_rank_sync_bn_step_equals_plain_bn_on_one_gpu():
    """In a 1-rank NCCL world (what one GPU allows), the trainer's conversion (`use_sync_batchnorm`) turns every BN
    into a SyncBatchNorm with the same state_dict keys, and a training step (forward, backward, running stats)
    equals the plain-BN step on the same batch; the converted state_dict loads into a plain model on the CPU."""
    import copy

    import torch.distributed as dist
    from torch import nn

    from mixmo_dist.model import build_model
    from mixmo_dist.model.sync_bn import use_sync_batchnorm

    def bn_count(net, kind) -> int:
        return sum(type(m) is kind for m in net.modules())

    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        torch.manual_seed(0)
        plain = build_model("resnet18", 2, 5).cuda()
        synced = use_sync_batchnorm(copy.deepcopy(plain), "cuda")
        assert bn_count(synced, nn.SyncBatchNorm) == bn_count(plain, nn.BatchNorm2d) > 0
        assert list(synced.state_dict()) == list(plain.state_dict())
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(2, 16, 3, 32, 32, device="cuda", generator=gen)
        boxes = torch.tensor([[4, 20, 4, 20]] * 16, device="cuda")
        coef = torch.full((2, 16), 0.5, device="cuda")
        outs = []
        for net in (plain, synced):
            net.train()
            logits = net(x, boxes, coef, coef)
            logits.square().mean().backward()
            outs.append((logits.detach(), [p.grad for p in net.parameters()], dict(net.state_dict())))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        for g0, g1 in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(g0, g1)
        for key, value in outs[0][2].items():
            torch.testing.assert_close(outs[1][2][key], value, msg=key)  # running stats updated alike
        cpu = build_model("resnet18", 2, 5)
        cpu.load_state_dict({k: v.cpu() for k, v in synced.state_dict().items()}, strict=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_train_forward_uses_the_kernel_and_matches_eager():
    """torch.compile (Inductor, one graph) of MixMoNet.forward_train: the Triton op is in the graph, logits and
    gradients match eager (float32, so the comparison is tight; AMP + compile runs in benchmarks/bench_gpu.py)."""
    from torch._inductor.compile_fx import compile_fx

    from mixmo_dist.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 2, 10).cuda().to(memory_format=torch.channels_last).train()
    x = [torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    height, width = model.encoder_output_hw(64, 64)
    mix = sample_mixing(8, 2, height, width, mixing="cut", alpha=2.0, cut_prob=1.0, generator=None, device="cuda")
    targets = []

    def inductor_recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compile_fx(gm, example_inputs)

    # BatchNorm in train mode updates running stats: run eager and compiled from the same state, on copies.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits_ref = model.forward_train(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    logits_ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model.forward_train, backend=inductor_recording, fullgraph=True)
    logits = compiled(x, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    logits.square().mean().backward()
    assert any("mixmo.mix_fwd" in t for t in targets), sorted(set(targets))[:50]
    # cuDNN may pick other (TF32) algorithms for the compiled convolutions: compare at 1e-2, not bitwise.
    assert (logits - logits_ref).abs().max() <= 1e-2 * logits_ref.abs().max()
    for name in ("encoders.0.weight", "encoders.1.weight", "heads.0.weight", "heads.1.weight"):
        g, r = dict(model.named_parameters())[name].grad, grads_ref[name]
        assert torch.linalg.vector_norm(g - r) <= 2e-2 * torch.linalg.vector_norm(r), name


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/bench_gpu.py end to end on CPU with a tiny network: the script, its JSON and its exit status."""
    import json

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--device", "cpu", "--arch", "resnet18", "--batch", "2",
           "--image-size", "32", "--num-classes", "5", "--steps", "1", "--warmup", "1", "--dtypes", "bf16",
           "--compile", "off", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["errors"] == {} and result["skipped"] == []
    train = result["train"]["bf16_compile=False"]
    assert train["mixmo"]["img_per_s"] > 0 and train["vanilla"]["img_per_s"] > 0 and train["ratio"] > 0
    # Timed in turns, the order reversed every round (4 rounds by default), not one side's steps after the other's.
    assert train["turn_order"] == ["mixmo", "vanilla", "vanilla", "mixmo"] * 2, train["turn_order"]
    inference_round = ["vanilla", "folded", "mixmo_unfolded"]
    assert result["inference"]["turn_order"] == (inference_round + inference_round[::-1]) * 2
    assert result["inference"]["fold_max_abs_gap_fp32"] < 1e-4
