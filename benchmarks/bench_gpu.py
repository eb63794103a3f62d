"""Benchmark at ImageNet sizes on a GPU: MixMo train-step throughput against vanilla timm, and folded inference.

For every (AMP dtype, compile) setting it times whole train steps of a MixMo network (M members, batch repetition
2, the mixing sampler, the reweighted loss) and of the same timm architecture trained plainly, in the same process
on the same synthetic batch (224 px, channels_last, SGD with Nesterov momentum; fp16 through a GradScaler), and
reports images (rows) per second and the MixMo / vanilla ratio (and its inverse, the step-time ratio of the CPU
benchmark `train_step_ratio`). Both networks are built and warmed up first, then timed in turns (`--rounds` turns
of `--steps` steps each, the order reversed every round; the median turn counts), as the CPU benchmarks do.
Inference compares the folded MixMo model (`MixMoNet.fold()`: one plain timm network) and the unfolded ensemble
forward against vanilla timm, in turns too.

Runs without DALI or submitit (the GPU machines have neither): data are random tensors on the device. Errors in
one setting are recorded and the others still run; the exit status is 1 if any setting failed. A time budget
keeps the whole run bounded: settings that would not fit (compiled ones first) are skipped and listed as skipped,
and `bench_gpu.json` is rewritten after every setting, so a run killed from outside keeps what it measured.

    python -m benchmarks.bench_gpu --out DIR [--arch resnet50] [--batch 256] [--budget-s 330] [--quick]
    python -m benchmarks.bench_gpu --device cpu --arch resnet18 --batch 4 --image-size 64 --steps 2 --compile off
        (a CPU smoke run of the script itself, not a measurement)
"""

import argparse
import json
import platform
import statistics
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
# One eager setting: two models built, warmed up, timed in turns (ResNet-50, batch 256, on an H100-class card).
_EAGER_ESTIMATE_S = 20.0


@dataclass
class Settings:
    """What to run: arch and sizes, settings to sweep, and the time budget."""

    device: str = "cuda"
    arch: str = "resnet50"
    members: int = 2
    batch: int = 256
    image_size: int = 224
    num_classes: int = 1000
    steps: int = 10
    warmup: int = 5
    rounds: int = 4
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    compile_modes: tuple[bool, ...] = (False, True)
    budget_s: float = 330.0
    started: float = field(default_factory=time.monotonic)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_turns(
    steps: dict[str, Callable[[], object]], rows: int, cfg: Settings, device: torch.device
) -> tuple[dict[str, float], list[str]]:
    """Rows per second of each step function, the functions taking turns (A B, B A, A B, ...) after warm-up.

    Each turn times `cfg.steps` calls between two device syncs; the order of the functions is reversed every round
    so drift (clocks, other tenants) hits both sides alike. Returns ({name: rows/s from its median turn}, the names
    in the order their turns ran).
    """
    for step in steps.values():
        for _ in range(cfg.warmup):
            step()
    _sync(device)
    turns: dict[str, list[float]] = {name: [] for name in steps}
    order = []
    names = list(steps)
    for round_ in range(cfg.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            _sync(device)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                steps[name]()
            _sync(device)
            turns[name].append(time.perf_counter() - start)
            order.append(name)
    return {name: rows * cfg.steps / statistics.median(t) for name, t in turns.items()}, order


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
    """MixMo and vanilla under one setting, both built (and compiled, if asked) first, then timed in turns."""
    dtype = _DTYPES[dtype_name]
    result: dict = {}
    steps = {}
    for name, build in (("mixmo", _mixmo_step), ("vanilla", _vanilla_step)):
        start = time.monotonic()
        steps[name] = build(cfg, dtype, compiled, device)
        loss = steps[name]()  # the first call compiles when asked; its loss must be finite
        if not torch.isfinite(loss).item():
            raise FloatingPointError(f"{name} {dtype_name} compile={compiled}: non-finite loss {loss.item()}")
        result[name] = {"setup_s": time.monotonic() - start}
    rates, result["turn_order"] = _timed_turns(steps, cfg.batch, cfg, device)
    for name, rate in rates.items():
        result[name]["img_per_s"] = rate
    if device.type == "cuda":
        result["peak_mem_GiB_both"] = torch.cuda.max_memory_allocated(device) / 2**30
    del steps
    _release(device)
    result["ratio"] = result["mixmo"]["img_per_s"] / result["vanilla"]["img_per_s"]
    result["step_time_ratio"] = 1.0 / result["ratio"]  # MixMo step / vanilla step, as the CPU train_step_ratio
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

        models = (("vanilla", vanilla), ("folded", folded), ("mixmo_unfolded", mixmo))
        rates, order = _timed_turns({name: forward(model) for name, model in models}, cfg.batch, cfg, device)
    return {
        "img_per_s": rates,
        "folded_vs_vanilla": rates["folded"] / rates["vanilla"],
        "unfolded_vs_vanilla": rates["mixmo_unfolded"] / rates["vanilla"],
        "turn_order": order,
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
    # The first eager setting, inference, the other eager settings, then compiled ones (skipped when time runs
    # short). The JSON is rewritten after each, so a run killed at its hard cap keeps what it measured.
    eager = [d for d in cfg.dtypes if False in cfg.compile_modes]
    plan = [("train", d, False) for d in eager[:1]] + [("inference", None, False)]
    plan += [("train", d, False) for d in eager[1:]]
    plan += [("train", d, True) for d in cfg.dtypes if True in cfg.compile_modes]
    compile_estimate_s = _COMPILE_ESTIMATE_S
    for kind, dtype_name, compiled in plan:
        key = f"{dtype_name}_compile={compiled}" if kind == "train" else "inference"
        # A compiled setting compiles two models; the first one measured sets the estimate for the next.
        needed_s = 2 * (compile_estimate_s + 10.0) if compiled else _EAGER_ESTIMATE_S
        if cfg.left_s() < needed_s:
            result["skipped"].append(key)
            print(f"  {key}: SKIPPED, {cfg.left_s():.0f} s left of the budget, ~{needed_s:.0f} s needed", flush=True)
        elif kind == "inference":
            try:
                result["inference"] = _inference(cfg, device)
            except Exception as err:  # as in _run_setting: recorded, the others still run
                result["errors"]["inference"] = "".join(traceback.format_exception(err))[-4000:]
                print(f"  inference: ERROR {type(err).__name__}: {err}", flush=True)
                _release(device)
        else:
            res = _run_setting(cfg, result, dtype_name, compiled, device)
            if res and compiled:
                compile_estimate_s = max(res["mixmo"]["setup_s"], res["vanilla"]["setup_s"])
        result["elapsed_s"] = time.monotonic() - cfg.started
        _write(result, out_dir)
    _print_table(result)
    return result


def _write(result: dict, out_dir: Path | str | None) -> None:
    """bench_gpu.json under out_dir (if given), replaced atomically."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench_gpu.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "bench_gpu.json")


def _print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{env.get('gpu', env['device'])} | torch {env['torch']} | triton {env['triton']} | timm {env['timm']}")
    print(f"  {'train setting':<22}{'mixmo img/s':>13}{'vanilla img/s':>15}{'ratio':>8}{'step time ratio':>17}")
    for key, res in result["train"].items():
        print(f"  {key:<22}{res['mixmo']['img_per_s']:13.0f}{res['vanilla']['img_per_s']:15.0f}{res['ratio']:8.3f}"
              f"{res['step_time_ratio']:17.3f}")  # fmt: skip
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
    parser.add_argument("--steps", type=int, default=10, help="timed steps per turn")
    parser.add_argument("--rounds", type=int, default=4, help="timed turns of each side (MixMo, vanilla) per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated AMP dtypes: bf16, fp16")
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"])
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip compiled settings past this many seconds")
    parser.add_argument("--quick", action="store_true", help="batch 64, 2 turns of 5 steps: a smoke run only")
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
        rounds=2 if args.quick else args.rounds,
        dtypes=dtypes,
        compile_modes={"both": (False, True), "on": (True,), "off": (False,)}[args.compile],
        budget_s=args.budget_s,
    )
    result = run(cfg, args.out)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
