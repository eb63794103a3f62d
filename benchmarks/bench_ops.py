"""Benchmark: the mixing ops against the reference's per-sample masks and against the memory floor.

Three ratios, each of medians over many repeats after warm-up, the timed functions taking turns (CPU: 2 intra-op
threads, wall clock; CUDA: events):

- `mask_speedup`: the reference's masks / the batched `cutmix_masks`, B=256 at 112x112. The reference builds one
  float32 numpy map per sample (`np.zeros((H, W))`, the clipped box set to 1, `mask.mean()` as the realised ratio),
  then `np.stack` + `torch.from_numpy`. Both get the same target areas (sampling them is not timed on either side).
  `mask_speedup_reused_out`: the same with `cutmix_masks(..., out=buffer)` writing into a buffer kept across calls,
  as a training loop would: on CPU a fresh 12.8 MB tensor is a fresh mapping whose page faults cost more than the
  write itself.
- `mixing_vs_add`: `mix_features` forward of two [64,64,112,112] float32 maps / `a + b` on the same maps. `a + b`
  is the floor: it reads both maps once and writes one, as the mixing block must.
- `mixing_backward_vs_write`: the mixing backward (autograd.grad into both members) / the cheapest way to produce
  the two gradient maps from grad_z: `torch.mul(g, 1.0)` twice. That floor allocates both outputs (autograd must
  return fresh tensors: on CPU a fresh allocation is a fresh, kernel-zeroed mapping) and reads g twice; a fused
  backward can read g once, so it may beat this floor (ratio < 1). `torch.mul(g, 1.0, out=...)` into reused
  buffers is reported too, as the floor without allocation.

On a CUDA machine the same ratios are measured on the GPU (the dispatcher's Triton path), plus the vectorised torch
path there for comparison, in float32 and bfloat16 at batch 256.

    python -m benchmarks.bench_ops [--quick] [--json PATH]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mixmo_dist.ops import cutmix_masks, mix_features, mix_features_torch, sample_mixing

__all__ = ["run"]

_MASK_BATCH, _MASK_SIZE = 256, 112
_MIX_SHAPE = (64, 64, 112, 112)
_MIX_SHAPE_QUICK = (8, 64, 56, 56)
_GPU_SHAPE = (256, 64, 112, 112)


def reference_masks(lam_B: np.ndarray, height: int, width: int, rng: np.random.Generator) -> tuple:
    """The reference's per-sample CutMix masks: a Python loop, one numpy map per sample, then a stack.

    Returns:
        (mask_B1HW float32 torch tensor, realised ratios [B] float32 torch tensor).
    """
    masks, lams = [], []
    for lam in lam_B:
        cut_h, cut_w = int(height * np.sqrt(lam)), int(width * np.sqrt(lam))
        cy, cx = rng.integers(height), rng.integers(width)
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        mask = np.zeros((height, width), dtype=np.float32)
        mask[y0:y1, x0:x1] = 1.0
        masks.append(mask)
        lams.append(mask.mean())
    mask_B1HW = torch.from_numpy(np.stack(masks)[:, None])
    return mask_B1HW, torch.from_numpy(np.asarray(lams, dtype=np.float32))


def _cpu_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def _cuda_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _medians(fns: dict[str, Callable[[], object]], timer: Callable, repeats: int, warmup: int = 2) -> dict:
    """Median time (ms) of each function, the functions taking turns in every round.

    Taking turns keeps a ratio fair when other processes load the machine unevenly over time (the CPU of this
    project's machines is shared), which timing one function's repeats after the other's would not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _minor_faults(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median minor page faults per call of each function, taking turns as in `_medians` (Linux `getrusage`).

    A fresh tensor that the allocator maps anew costs one fault per 4 KiB page touched; this tells that cost apart
    from the work itself.
    """
    import resource

    counts: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            counts[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {name: statistics.median(c) for name, c in counts.items()}


def _mixing_case(shape, dtype, device, generator, mix_fn, timer, repeats: int) -> dict:
    """Forward and backward times of `mix_fn` on two maps of `shape`, with their floors, in ms."""
    batch, _, height, width = shape
    feats = [torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype) for _ in range(2)]
    grad_z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    mix = sample_mixing(
        batch, 2, height, width, mixing="cut", alpha=2.0, cut_prob=1.0, generator=generator, device=device
    )
    args = (mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
    a, b = feats
    leaves = [x.clone().requires_grad_(True) for x in feats]
    z = mix_fn(leaves, *args)
    out0, out1 = torch.empty_like(grad_z), torch.empty_like(grad_z)
    fns = {
        "add": lambda: a + b,
        "mix_fwd": lambda: mix_fn(feats, *args),
        "mix_bwd": lambda: torch.autograd.grad(z, leaves, grad_z, retain_graph=True),
        "write2": lambda: (torch.mul(grad_z, 1.0), torch.mul(grad_z, 1.0)),
        "write2_out": lambda: (torch.mul(grad_z, 1.0, out=out0), torch.mul(grad_z, 1.0, out=out1)),
    }
    return _medians(fns, timer, repeats)


def _ratios(ms: dict) -> dict:
    return {
        "mixing_vs_add": ms["mix_fwd"] / ms["add"],
        "mixing_backward_vs_write": ms["mix_bwd"] / ms["write2"],
        "mixing_backward_vs_write_out": ms["mix_bwd"] / ms["write2_out"],
    }


def _run_cpu(quick: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    lam_np = rng.beta(2.0, 2.0, size=_MASK_BATCH)
    lam_t = torch.from_numpy(lam_np).float()
    out = torch.empty(_MASK_BATCH, 1, _MASK_SIZE, _MASK_SIZE)
    masks = {
        "mask_reference": lambda: reference_masks(lam_np, _MASK_SIZE, _MASK_SIZE, rng),
        "mask_batched": lambda: cutmix_masks(lam_t, _MASK_SIZE, _MASK_SIZE, generator),
        "mask_batched_out": lambda: cutmix_masks(lam_t, _MASK_SIZE, _MASK_SIZE, generator, out=out),
    }
    mask_ms = _medians(masks, _cpu_ms, 10 if quick else 50)
    faults = _minor_faults(masks, 5 if quick else 20)
    shape = _MIX_SHAPE_QUICK if quick else _MIX_SHAPE
    ms = _mixing_case(shape, torch.float32, "cpu", generator, mix_features, _cpu_ms, 5 if quick else 15)
    return {
        "mask_speedup": mask_ms["mask_reference"] / mask_ms["mask_batched"],
        "mask_speedup_reused_out": mask_ms["mask_reference"] / mask_ms["mask_batched_out"],
        **_ratios(ms),
        "ms": {**mask_ms, **ms},
        "mask_page_faults_per_call": faults,
        "mix_shape": list(shape),
    }


def _run_device(quick: bool, device: torch.device) -> dict:
    """The GPU section: batched masks, then the mixing block through the dispatcher and through the torch path."""
    timer = _cuda_ms if device.type == "cuda" else _cpu_ms
    generator = torch.Generator(device=device).manual_seed(0)
    lam_t = torch.distributions.Beta(2.0, 2.0).sample((_MASK_BATCH,)).to(device)
    repeats = 20 if quick else 100
    masks = {"masks": lambda: cutmix_masks(lam_t, _MASK_SIZE, _MASK_SIZE, generator)}
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "mask_batched_ms": _medians(masks, timer, repeats)["masks"],
    }
    shape = _MIX_SHAPE_QUICK if quick else _GPU_SHAPE
    out["mix_shape"] = list(shape)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for path, fn in (("dispatch", mix_features), ("torch", mix_features_torch)):
            ms = _mixing_case(shape, dtype, device, generator, fn, timer, repeats)
            # Bytes a fused forward must move: read 2 maps, write 1. Achieved bandwidth shows the gap to the card.
            nbytes = 3 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out[f"{name}_{path}"] = {**_ratios(ms), "ms": ms, "fwd_GBps": nbytes / ms["mix_fwd"] / 1e6}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _print_table(result: dict) -> None:
    if "cpu" in result:
        _print_cpu(result["cpu"])
    if "cuda" in result:
        _print_gpu(result["cuda"])


def _print_cpu(cpu: dict) -> None:
    rows = [
        ("mask_speedup (ref / batched), B=256 112x112", cpu["mask_speedup"], ">= 10"),
        ("mask_speedup_reused_out (ref / batched into a kept buffer)", cpu["mask_speedup_reused_out"], ">= 10"),
        (f"mixing_vs_add, 2 x {cpu['mix_shape']} fp32", cpu["mixing_vs_add"], "<= 1.25"),
        ("mixing_backward_vs_write (fresh outputs)", cpu["mixing_backward_vs_write"], "~1"),
        ("mixing_backward_vs_write (out= buffers)", cpu["mixing_backward_vs_write_out"], "info"),
    ]
    print(f"ops on CPU ({torch.get_num_threads()} threads), medians; times in ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu["ms"].items()))  # fmt: skip
    print("  minor page faults per call (median): "
          + ", ".join(f"{k} {v:.0f}" for k, v in cpu["mask_page_faults_per_call"].items()))  # fmt: skip
    print(f"  {'ratio':<52}{'value':>8}  goal")
    for name, value, goal in rows:
        print(f"  {name:<52}{value:8.2f}  {goal}")


def _print_gpu(gpu: dict) -> None:
    print(f"ops on {gpu['device']}, 2 x {gpu['mix_shape']}, medians (CUDA events); batched masks "
          f"{gpu['mask_batched_ms']:.3f} ms")  # fmt: skip
    print(f"  {'path':<18}{'fwd/add':>9}{'bwd/write':>11}{'fwd ms':>9}{'add ms':>9}{'bwd ms':>9}{'fwd GB/s':>10}")
    for key, res in gpu.items():
        if isinstance(res, dict) and "ms" in res:
            ms = res["ms"]
            print(f"  {key:<18}{res['mixing_vs_add']:9.3f}{res['mixing_backward_vs_write']:11.3f}"
                  f"{ms['mix_fwd']:9.3f}{ms['add']:9.3f}{ms['mix_bwd']:9.3f}{res['fwd_GBps']:10.0f}")  # fmt: skip
    print("  goal on the GPU: fwd/add <= 1.1 for the dispatch (Triton) path")


def run(quick: bool = False, gpu_only: bool = False) -> dict:
    """Measure the ratios on CPU (2 threads, float32) and, when CUDA is there, on the GPU.

    Args:
        quick: smaller maps and fewer repeats (a smoke run of the benchmark, not a measurement to quote).
        gpu_only: skip the CPU section (the GPU runbook: the CPU figures come from `make bench` on the CPU machines).
    Returns:
        {"mask_speedup", "mask_speedup_reused_out", "mixing_vs_add", "mixing_backward_vs_write": CPU ratios;
        "cpu": all CPU numbers; with CUDA also "cuda": GPU numbers per dtype and path, and "gpu_mixing_vs_add[_bf16]",
        "gpu_mixing_backward_vs_write[_bf16]": the dispatcher's (Triton) ratios on the GPU}.
    """
    if gpu_only and not torch.cuda.is_available():
        raise RuntimeError("bench_ops --gpu-only: torch sees no CUDA device")
    result: dict = {}
    if not gpu_only:
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            cpu = _run_cpu(quick)
        finally:
            torch.set_num_threads(threads)
        keys = ("mask_speedup", "mask_speedup_reused_out", "mixing_vs_add", "mixing_backward_vs_write")
        result.update({k: cpu[k] for k in keys})
        result["cpu"] = cpu
    if torch.cuda.is_available():
        result["cuda"] = gpu = _run_device(quick, torch.device("cuda"))
        # Flat copies for benchmarks/run_all.py, which keeps scalars only (goal on the GPU: fwd/add <= 1.1).
        for name in ("float32", "bfloat16"):
            suffix = "" if name == "float32" else "_bf16"
            result[f"gpu_mixing_vs_add{suffix}"] = gpu[f"{name}_dispatch"]["mixing_vs_add"]
            result[f"gpu_mixing_backward_vs_write{suffix}"] = gpu[f"{name}_dispatch"]["mixing_backward_vs_write"]
    _print_table(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run, not a measurement")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU section (needs CUDA)")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, gpu_only=args.gpu_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
