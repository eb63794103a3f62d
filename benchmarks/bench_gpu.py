"""Benchmark at ImageNet sizes on a GPU: MixMo train-step throughput against vanilla timm, and folded inference.

For every (AMP dtype, compile) setting it times whole train steps of a MixMo network (M members, batch repetition
2, the mixing sampler, the reweighted loss) and of the same timm architecture trained plainly, in the same process
on the same synthetic batch (224 px, channels_last, SGD with Nesterov momentum; fp16 through a GradScaler), and
reports images (rows) per second and the MixMo / vanilla ratio. Inference compares the folded MixMo model
(`MixMoNet.fold()`: one plain timm network) and the unfolded ensemble forward against vanilla timm.

Runs without DALI or submitit (the GPU machines have neither): data are random tensors on the device. Errors in
one setting are recorded and the others still run; the exit status is 1 if any setting failed. A time budget
keeps the whole run bounded: compiled settings that would not fit are skipped and listed as skipped.

    python -m benchmarks.bench_gpu --out DIR [--arch resnet50] [--batch 256] [--budget-s 330] [--quick]
    python -m benchmarks.bench_gpu --device cpu --arch resnet18 --batch 4 --image-size 64 --steps 2 --compile off
        (a CPU smoke run of the script itself, not a measurement)
"""

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from mixmo_dist.model import build_model
from mixmo_dist.ops import sample_mixing
from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_inputs

__all__ = ["run"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Guess for a cold compile of one ResNet-50 train step (forward + backward) with 16 CPU cores, until one is measured.
_COMPILE_ESTIMATE_S = 60.0


@dataclass
class Settings:
    """What to run: arch and sizes, settings to sweep, and the time budget."""

    device: str = "cuda"
    arch: str = "resnet50"
    members: int = 2
    batch: int = 256
    image_size: int = 224
    num_classes: int = 1000
    steps: int = 20
    warmup: int = 5
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    compile_modes: tuple[bool, ...] = (False, True)
    budget_s: float = 330.0
    started: float = field(default_factory=time.monotonic)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rate(step: Callable[[], object], rows: int, steps: int, warmup: int, device: torch.device) -> float:
    """Rows per second over `steps` calls after `warmup` (compilation happens in the warm-up)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return rows * steps / (time.perf_counter() - start)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _mixmo_step(cfg: Settings, dtype: torch.dtype, compiled: bool, device: torch.device) -> Callable[[], object]:
    """One MixMo train step: member inputs -> mixing sample -> forward (AMP) -> reweighted loss -> backward -> SGD."""
    model = build_model(cfg.arch, cfg.members, cfg.num_classes).to(device).to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model.forward_train) if compiled else model.forward_train
    optimizer = _optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)
    unique = cfg.batch // 2  # batch repetition 2, as in the ImageNet recipe
    images_UCHW = torch.randn(unique, 3, cfg.image_size, cfg.image_size, device=device)
    images_UCHW = images_UCHW.contiguous(memory_format=torch.channels_last)
    labels_U = torch.randint(0, cfg.num_classes, (unique,), device=device)
    height, width = model.encoder_output_hw(cfg.image_size, cfg.image_size)

    def step():
        x_MRCHW, y_MR = member_inputs(
            images_UCHW, labels_U, num_members=cfg.members, repetitions=2, input_repetition=0.0, generator=generator
        )
        mix = sample_mixing(
            cfg.batch, cfg.members, height, width, mixing="cut", alpha=2.0, cut_prob=0.5, generator=generator,
            device=device,
        )  # fmt: skip
        with torch.autocast(device.type, dtype=dtype):
            logits_MRK = forward(x_MRCHW, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        loss, _ = mixmo_loss(logits_MRK, y_MR, reweight(mix.lam_MB, 3.0))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def _vanilla_step(cfg: Settings, dtype: torch.dtype, compiled: bool, device: torch.device) -> Callable[[], object]:
    """One plain timm train step on the same number of rows: forward (AMP) -> cross-entropy -> backward -> SGD."""
    model = timm.create_model(cfg.arch, num_classes=cfg.num_classes, pretrained=False)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    forward = torch.compile(model) if compiled else model
    optimizer = _optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images_BCHW = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device)
    images_BCHW = images_BCHW.contiguous(memory_format=torch.channels_last)
    labels_B = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            logits_BK = forward(images_BCHW)
        loss = F.cross_entropy(logits_BK.float(), labels_B)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _train_setting(cfg: Settings, dtype_name: str, compiled: bool, device: torch.device) -> dict:
    """MixMo then vanilla under one setting, each built fresh (and compiled, if asked) and released after."""
    dtype = _DTYPES[dtype_name]
    result = {}
    for name, build in (("mixmo", _mixmo_step), ("vanilla", _vanilla_step)):
        start = time.monotonic()
        step = build(cfg, dtype, compiled, device)
        loss = step()  # the first call compiles when asked; its loss must be finite
        if not torch.isfinite(loss).item():
            raise FloatingPointError(f"{name} {dtype_name} compile={compiled}: non-finite loss {loss.item()}")
        rate = _timed_rate(step, cfg.batch, cfg.steps, cfg.warmup, device)
        result[name] = {"img_per_s": rate, "setup_s": time.monotonic() - start}
        if device.type == "cuda":
            result[name]["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        del step
        _release(device)
    result["ratio"] = result["mixmo"]["img_per_s"] / result["vanilla"]["img_per_s"]
    return result


def _inference(cfg: Settings, device: torch.device) -> dict:
    """Eval throughput (bf16 autocast, channels_last, eager): vanilla timm, folded MixMo, unfolded MixMo."""
    mixmo = build_model(cfg.arch, cfg.members, cfg.num_classes).to(device).to(memory_format=torch.channels_last)
    mixmo.eval()
    folded = mixmo.fold().to(memory_format=torch.channels_last).eval()
    vanilla = timm.create_model(cfg.arch, num_classes=cfg.num_classes, pretrained=False)
    vanilla = vanilla.to(device).to(memory_format=torch.channels_last).eval()
    images_BCHW = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device)
    images_BCHW = images_BCHW.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        # Folding is exact: the folded logits are the mean of the member logits (checked in float32).
        gap = (folded(images_BCHW[:8]) - mixmo(images_BCHW[:8]).mean(0)).abs().max().item()

        def forward(model):
            def call():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model(images_BCHW)

            return call

        rates = {
            name: _timed_rate(forward(model), cfg.batch, cfg.steps, cfg.warmup, device)
            for name, model in (("vanilla", vanilla), ("folded", folded), ("mixmo_unfolded", mixmo))
        }
    return {
        "img_per_s": rates,
        "folded_vs_vanilla": rates["folded"] / rates["vanilla"],
        "unfolded_vs_vanilla": rates["mixmo_unfolded"] / rates["vanilla"],
        "fold_max_abs_gap_fp32": gap,
    }


def _environment(device: torch.device) -> dict:
    import triton  # for its version only; imported here so the module itself needs no Triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_mem_GiB=props.total_memory / 2**30)
    return env


def _run_setting(cfg: Settings, result: dict, dtype_name: str, compiled: bool, device: torch.device) -> dict | None:
    """One train setting into `result["train"]`, or its traceback into `result["errors"]` (then None)."""
    key = f"{dtype_name}_compile={compiled}"
    try:
        result["train"][key] = res = _train_setting(cfg, dtype_name, compiled, device)
    except Exception as err:  # one broken setting must not hide the others' numbers; the exit status says it
        result["errors"][key] = "".join(traceback.format_exception(err))[-4000:]
        print(f"  {key}: ERROR {type(err).__name__}: {err}", flush=True)
        _release(device)
        return None
    print(f"  {key}: mixmo {res['mixmo']['img_per_s']:.0f} img/s, vanilla {res['vanilla']['img_per_s']:.0f} img/s, "
          f"ratio {res['ratio']:.3f} (setup incl. compile {res['mixmo']['setup_s']:.0f} s / "
          f"{res['vanilla']['setup_s']:.0f} s)", flush=True)  # fmt: skip
    return res


def run(cfg: Settings, out_dir: Path | str | None = None) -> dict:
    """Run every setting; write `bench_gpu.json` under `out_dir` (if given) and print a table.

    Returns:
        {"environment", "settings", "train": {"<dtype>_compile=<bool>": {...}}, "inference", "errors", "skipped"}.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_gpu: --device cuda but torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    result = {"environment": _environment(device), "settings": asdict(cfg), "train": {}, "errors": {}, "skipped": []}
    print(f"bench_gpu on {result['environment'].get('gpu', device)}: {cfg.arch}, M={cfg.members}, batch {cfg.batch}, "
          f"{cfg.image_size} px, channels_last, budget {cfg.budget_s:.0f} s", flush=True)  # fmt: skip
    # Eager settings and inference first: they are cheap; compiled settings are skipped when time runs short.
    compile_estimate_s = _COMPILE_ESTIMATE_S
    for dtype_name in cfg.dtypes:
        if False in cfg.compile_modes:
            _run_setting(cfg, result, dtype_name, False, device)
    try:
        result["inference"] = _inference(cfg, device)
    except Exception as err:
        result["errors"]["inference"] = "".join(traceback.format_exception(err))[-4000:]
        print(f"  inference: ERROR {type(err).__name__}: {err}", flush=True)
        _release(device)
    for dtype_name in cfg.dtypes:
        if True not in cfg.compile_modes:
            continue
        key = f"{dtype_name}_compile=True"
        # Each compiled setting compiles two models; the first one measured sets the estimate for the next.
        needed_s = 2 * (compile_estimate_s + 10.0)  # + warm-up and timed steps
        if cfg.left_s() < needed_s:
            result["skipped"].append(key)
            print(f"  {key}: SKIPPED, {cfg.left_s():.0f} s left of the budget, ~{needed_s:.0f} s needed", flush=True)
            continue
        res = _run_setting(cfg, result, dtype_name, True, device)
        if res:
            compile_estimate_s = max(res["mixmo"]["setup_s"], res["vanilla"]["setup_s"])
    result["elapsed_s"] = time.monotonic() - cfg.started
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{env.get('gpu', env['device'])} | torch {env['torch']} | triton {env['triton']} | timm {env['timm']}")
    print(f"  {'train setting':<22}{'mixmo img/s':>13}{'vanilla img/s':>15}{'ratio':>8}")
    for key, res in result["train"].items():
        print(f"  {key:<22}{res['mixmo']['img_per_s']:13.0f}{res['vanilla']['img_per_s']:15.0f}{res['ratio']:8.3f}")
    for key in result["skipped"]:
        print(f"  {key:<22}{'skipped (time budget)':>36}")
    inf = result.get("inference")
    if inf:
        rates = inf["img_per_s"]
        print(f"  inference bf16: vanilla {rates['vanilla']:.0f}, folded {rates['folded']:.0f}, unfolded "
              f"{rates['mixmo_unfolded']:.0f} img/s; folded/vanilla {inf['folded_vs_vanilla']:.3f}, unfolded/vanilla "
              f"{inf['unfolded_vs_vanilla']:.3f}; fold gap {inf['fold_max_abs_gap_fp32']:.2e}")  # fmt: skip
    for key, err in result["errors"].items():
        print(f"  ERROR in {key}:\n{err}")
    print(f"  total {result['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for bench_gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated AMP dtypes: bf16, fp16")
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"])
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip compiled settings past this many seconds")
    parser.add_argument("--quick", action="store_true", help="batch 64, 5 steps: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if args.batch % 2 or args.batch < 2:
        parser.error(f"--batch must be even (batch repetition 2), got {args.batch}")
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtypes: unknown {unknown or dtypes}; choose from {', '.join(_DTYPES)}")
    cfg = Settings(
        device=args.device,
        arch=args.arch,
        members=args.members,
        batch=64 if args.quick else args.batch,
        image_size=args.image_size,
        num_classes=args.num_classes,
        steps=5 if args.quick else args.steps,
        warmup=2 if args.quick else args.warmup,
        dtypes=dtypes,
        compile_modes={"both": (False, True), "on": (True,), "off": (False,)}[args.compile],
        budget_s=args.budget_s,
    )
    result = run(cfg, args.out)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
