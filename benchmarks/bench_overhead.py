"""Benchmark: the trainer, launched as a user launches it, against a bare training loop doing the same work.

(a) `accelerate launch -m mixmo_dist.train` (vanilla: `mixmo.num_members=1`, `mixmo.batch_repetitions=1`, so one
    encoder and one head, no mixing), and (b) the loop in `bare_main` below, launched with `python` (one process) or
    `torchrun` (several ranks): timm resnet18, torchvision ImageFolder with the same augmentation
    (RandomResizedCrop 32, scale (0.25, 1), flip; validation resize 36 + centre crop 32), a DataLoader with 2 workers
    per rank, SGD (momentum 0.9, Nesterov, weight decay 5e-4, the same warmup + cosine per step), channels_last,
    DDP over gloo (NCCL on CUDA) without buffer broadcast, one evaluation per epoch on every rank's disjoint share
    of the validation split (top-1 and NLL summed over the ranks). Both use the same intra-op threads per rank (the
    trainer's auto rule: the CPUs of the affinity / the ranks on the node).

Data: a real JPEG folder from `mixmo_dist.data.demo` (10 classes, 64 train and 20 val images per class, 72 px
stored, 32 px crops), 64 images per step over all ranks, 10 epochs (100 steps), an evaluation every epoch.

What the trainer does that the bare loop does not (its guarantees, all inside the measured time): the run lock,
run.json / config.yaml, a metrics line every 10 steps (an all-reduce of the losses, the gradient norm of that
step), the per-step all-reduce of its agreement flags (non-finite loss, stop signal, loader error), the per-step
member shuffle and mixing draw of a one-member MixMo step, exact validation (every image once, calibration
metrics), and the final checkpoint (weights, optimizer, every rank's RNG and data position, sha256-verified).

Figures, per world size, the two sides taking turns (A B A B ...; medians of the rounds):
- wall: launch to exit of the whole run (the launcher's own start included);
- first step: launch to the end of the first optimizer step (seen as the line rank 0 prints then: the trainer's
  `startup:` line, the loop's `first step` line);
- step: median over steps 10, 20, ... of the in-process time of one step (waiting for the batch + the step up to
  its host sync), read from the trainer's metrics.jsonl and the loop's own record of the same steps.
Ratios are trainer / bare loop (lower is better; the goal is wall <= 1.05).

    python -m benchmarks.bench_overhead [--quick] [--device cpu|cuda] [--ranks 1 2] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IMAGE_SIZE = 32
_GLOBAL_BATCH = 64
_WORKERS = 2
_LR = 0.2  # the trainer's default: optim.lr 0.8 for 256 unique images, scaled to 64
_WARMUP_EPOCHS = 1.0
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the trainer's imagefolder normalisation (ImageNet)
_FIRST_STEP_MARK = {"trainer": " INFO startup: ", "trainer_python": " INFO startup: ", "bare": "first step done"}

__all__ = ["run"]


# -- the bare loop ----------------------------------------------------------------------------------------------
def bare_main(argv: list[str]) -> int:
    """The loop a user writes by hand (see the module docstring); rank 0 writes the per-step times to --out."""
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-threads", type=int, default=0)
    args = p.parse_args(argv)
    import timm
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision import datasets
    from torchvision import transforms as T

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.num_threads or max(len(os.sched_getaffinity(0)) // local_world, 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    norm = T.Normalize(_MEAN, _STD)
    train_tf = T.Compose([T.RandomResizedCrop(_IMAGE_SIZE, scale=(0.25, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])  # fmt: skip
    val_tf = T.Compose([T.Resize(round(_IMAGE_SIZE / 0.875)), T.CenterCrop(_IMAGE_SIZE), T.ToTensor(), norm])
    train = datasets.ImageFolder(os.path.join(args.root, "train"), train_tf)
    val = datasets.ImageFolder(os.path.join(args.root, "val"), val_tf)
    sampler = DistributedSampler(train, shuffle=True, drop_last=True) if world > 1 else None
    per_rank = _GLOBAL_BATCH // world
    loader = DataLoader(train, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=_WORKERS, persistent_workers=True, pin_memory=cuda)  # fmt: skip
    val_loader = DataLoader(Subset(val, range(rank, len(val), world)), batch_size=per_rank, num_workers=_WORKERS,
                            pin_memory=cuda)  # fmt: skip
    model = timm.create_model("resnet18", num_classes=len(train.classes))
    model = model.to(device, memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = torch.optim.SGD(ddp.parameters(), lr=_LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(loader)
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch * _WARMUP_EPOCHS

    def lr_at(step: int) -> float:
        if step < warmup:
            return _LR * (step + 1) / warmup
        return _LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    step, times = 0, {}
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp.train()
        t0 = time.monotonic()
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(ddp(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = loss.item()  # the host sync a loop that watches its loss makes every step
            step += 1
            times[step] = time.monotonic() - t0
            if rank == 0 and step == 1:
                print(f"first step done (loss {loss_value:.4f})", flush=True)
            t0 = time.monotonic()
        ddp.eval()
        sums = torch.zeros(3, device=device, dtype=torch.float64)
        with torch.no_grad():
            for images, labels in val_loader:
                images = images.to(device, memory_format=torch.channels_last)
                labels = labels.to(device)
                logits = model(images).float()
                sums += torch.stack([(logits.argmax(1) == labels).sum().double(),
                                     F.cross_entropy(logits, labels, reduction="sum").double(),
                                     torch.tensor(float(len(labels)), device=device, dtype=torch.float64)])  # fmt: skip
        if world > 1:
            dist.all_reduce(sums)
        if rank == 0:
            correct, nll, count = sums.tolist()
            print(f"val epoch {epoch + 1}: top1 {correct / count:.4f} nll {nll / count:.4f}", flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_times": times}))
    if world > 1:
        dist.destroy_process_group()
    return 0


# -- the two launches -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_cmd(python: str, ranks: int, data: Path, out: Path, epochs: int, launcher: bool = True,
                 threads: int = 0) -> list[str]:  # fmt: skip
    launch = [python, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", str(ranks)]  # fmt: skip
    if ranks > 1:
        launch += ["--multi_gpu", "--main_process_port", str(_free_port())]
    if not launcher:  # one process without `accelerate launch`: what the launcher's own start costs
        launch = [python]
    return [
        *launch,
        "-m",
        "mixmo_dist.train",
        f"--data.root={data}",
        "--data.backend=torch",
        f"--data.image_size={_IMAGE_SIZE}",
        f"--data.global_batch_size={_GLOBAL_BATCH}",
        f"--data.num_workers={_WORKERS}",
        "--mixmo.num_members=1",
        "--mixmo.batch_repetitions=1",
        f"--schedule.epochs={epochs}",
        f"--schedule.warmup_epochs={_WARMUP_EPOCHS}",
        "--log.progress=lines",
        f"--run.output_dir={out}",
        f"--run.num_threads={threads}",
    ]


def _bare_cmd(python: str, ranks: int, data: Path, out: Path, epochs: int, threads: int = 0) -> list[str]:
    args = ["-m", "benchmarks.bench_overhead", "--bare", f"--root={data}", f"--epochs={epochs}", f"--out={out}",
            f"--num-threads={threads}"]  # fmt: skip
    if ranks == 1:
        return [python, *args]
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(_free_port()), *args]  # fmt: skip


def _env(device: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)  # what a user who sets nothing gets: the trainer's auto rule; the loop's own
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _timed_run(side: str, cmd: list[str], device: str, timeout_s: float) -> dict:
    """Runs one launch; returns wall seconds and the seconds to the line marking the end of the first step."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    first, tail = None, []
    assert proc.stdout is not None
    timed_out = False
    try:
        for line in proc.stdout:
            if first is None and _FIRST_STEP_MARK[side] in line:
                first = time.monotonic() - start
            tail = (tail + [line])[-40:]
            timed_out = time.monotonic() - start > timeout_s
            if timed_out:
                break
    except BaseException:  # this benchmark interrupted: the launch (its own process group) goes with it
        os.killpg(proc.pid, 9)
        raise
    if timed_out:
        os.killpg(proc.pid, 9)
    rc = proc.wait()
    wall = time.monotonic() - start
    if rc != 0 or first is None:
        raise RuntimeError(f"{side} run failed (exit {rc}): {' '.join(cmd)}\n{''.join(tail)}")
    return {"wall_s": wall, "first_step_s": first}


def _step_times(side: str, out: Path, steps: list[int]) -> list[float]:
    """The in-process time (batch wait + step) of each of `steps`."""
    if side.startswith("trainer"):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        per_step = {r["step"]: r["data_time"] + r["compute_time"] for r in recs if r["split"] == "train"}
    else:
        per_step = {int(k): v for k, v in json.loads(out.read_text())["step_times"].items()}
    return [per_step[s] for s in steps]


def measure(ranks: int, rounds: int, epochs: int, data: Path, work: Path, device: str = "cpu", threads: int = 0,
            python: str = sys.executable) -> dict:  # fmt: skip
    """Trainer and bare loop on `ranks` processes, taking turns for `rounds` rounds."""
    # One process: also the trainer started with plain `python -m mixmo_dist.train`, which a one-process run may use
    # instead of `accelerate launch`, to tell the launcher's own start from the trainer's.
    names = ("trainer", "bare", "trainer_python") if ranks == 1 else ("trainer", "bare")
    sides: dict[str, list[dict]] = {name: [] for name in names}
    steps_per_epoch = (len(list((data / "train").rglob("*.JPEG"))) // _GLOBAL_BATCH) or 1
    logged = list(range(10, steps_per_epoch * epochs + 1, 10))  # the trainer's default log.every_n_steps
    for round_ in range(rounds):
        for side in names:
            out = work / f"{side}_{ranks}_{round_}"
            out = out.with_suffix(".json") if side == "bare" else out
            if side == "bare":
                cmd = _bare_cmd(python, ranks, data, out, epochs, threads)
            else:
                cmd = _trainer_cmd(python, ranks, data, out, epochs, launcher=side == "trainer", threads=threads)
            res = _timed_run(side, cmd, device, timeout_s=600)
            res["step_s"] = statistics.median(_step_times(side, out, logged))
            sides[side].append(res)
            print(f"  {ranks} rank(s) round {round_ + 1} {side:14s}: wall {res['wall_s']:6.2f} s, first step "
                  f"{res['first_step_s']:5.2f} s, step {res['step_s'] * 1e3:6.1f} ms", flush=True)  # fmt: skip
    result: dict = {"rounds": sides}
    for key in ("wall_s", "first_step_s", "step_s"):
        med = {side: statistics.median(r[key] for r in runs) for side, runs in sides.items()}
        result[key] = med
        # Ratios per round (the turns of a round ran under the same load), then their median.
        for side in (name for name in names if name != "bare"):
            suffix = "" if side == "trainer" else "_python"
            result[key.removesuffix("_s") + "_ratio" + suffix] = statistics.median(
                t[key] / b[key] for t, b in zip(sides[side], sides["bare"])
            )
    return result


# The trainer as submitit's job runs it: `training.run` without train.py, so the forkserver starts with the first
# loader (after the model build), as before the early start.
_LATE_FORKSERVER = "import sys; from mixmo_dist.training.run import run; run(sys.argv[1:])"


def forkserver_ab(rounds: int, quick: bool = False, threads: int = 0, python: str = sys.executable) -> dict:
    """Time to the first step of one process (`python -m mixmo_dist.train`, the workers' forkserver started before
    torch is imported) against the same run with the forkserver started by the first loader; A B turns, 2 epochs."""
    times: dict[str, list[float]] = {"early": [], "late": []}
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", quick)
        for round_ in range(rounds):
            for side in ("early", "late"):
                out = work / f"{side}_{round_}"
                cmd = _trainer_cmd(python, 1, data, out, 2, launcher=False, threads=threads)
                if side == "late":
                    cmd[1:3] = ["-c", _LATE_FORKSERVER]
                res = _timed_run("trainer", cmd, "cpu", timeout_s=600)
                times[side].append(res["first_step_s"])
                print(f"  forkserver {side:5s} round {round_ + 1}: first step {res['first_step_s']:.2f} s", flush=True)
    ratio = statistics.median(e / late for e, late in zip(times["early"], times["late"]))
    print(f"time to the first step, early / late forkserver start: {ratio:.3f}", flush=True)
    return {"forkserver_early_first_step_ratio": ratio, "forkserver_early_first_step_s": statistics.median(
        times["early"]), "forkserver_late_first_step_s": statistics.median(times["late"])}  # fmt: skip


def make_data(root: Path, quick: bool) -> Path:
    train, val = (32, 10) if quick else (64, 20)
    subprocess.run([sys.executable, "-m", "mixmo_dist.data.demo", "--out", str(root), "--train-per-class", str(train),
                    "--val-per-class", str(val)], check=True, cwd=ROOT, env=_env(), capture_output=True)  # fmt: skip
    return root


def run(quick: bool = False, ranks: tuple[int, ...] = (1, 2), rounds: int | None = None, device: str = "cpu",
        json_path: str | None = None, threads: int = 0) -> dict:  # fmt: skip
    """Measures each world size in `ranks`. Returns flat keys for `make bench`: overhead_{wall,first_step,step}_
    ratio_{N}r (trainer / bare loop) and the trainer's and loop's medians; `json_path` is rewritten after every
    world size (a run cut off by a budget keeps what was measured)."""
    rounds = rounds or (1 if quick else 3)
    epochs = 2 if quick else 10
    flat: dict = {"overhead_device": device, "overhead_rounds": rounds, "overhead_epochs": epochs,
                  "overhead_num_threads": threads}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", quick)
        for n in ranks:
            res = measure(n, rounds, epochs, data, work, device, threads)
            for key in ("wall", "first_step", "step"):
                flat[f"overhead_{key}_ratio_{n}r"] = res[f"{key}_ratio"]
                if f"{key}_ratio_python" in res:
                    flat[f"overhead_{key}_ratio_python_{n}r"] = res[f"{key}_ratio_python"]
                for side, value in res[f"{key}_s"].items():
                    flat[f"overhead_{key}_s_{side}_{n}r"] = value
            print(f"{n} rank(s): trainer / bare loop: wall {res['wall_ratio']:.3f}, first step "
                  f"{res['first_step_ratio']:.3f}, step {res['step_ratio']:.3f}", flush=True)  # fmt: skip
            if "wall_ratio_python" in res:
                print(f"{n} rank(s): trainer without accelerate launch / bare loop: wall "
                      f"{res['wall_ratio_python']:.3f}, "
                      f"first step {res['first_step_ratio_python']:.3f}, step {res['step_ratio_python']:.3f}",
                      flush=True)  # fmt: skip
            if json_path:
                Path(json_path).write_text(json.dumps(flat, indent=2) + "\n")
    return flat


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bare"]:
        return bare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs of a smaller folder, one round (a smoke run)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    parser.add_argument("--rounds", type=int, default=None, help="turns per side (default 3, quick 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: both sides on the GPU (one rank per GPU)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="intra-op threads per rank on both sides (0: the trainer's auto rule); 1 keeps a loaded "
                        "machine from stalling OpenMP's barriers")  # fmt: skip
    parser.add_argument("--forkserver-ab", action="store_true",
                        help="only the start-up A/B: early against late forkserver start, one process")  # fmt: skip
    args = parser.parse_args(argv)
    # SIGTERM (a runbook's stage budget) as an exception, so the running launch is killed with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.forkserver_ab:
        result = forkserver_ab(args.rounds or (1 if args.quick else 4), args.quick, args.num_threads)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    run(
        quick=args.quick,
        ranks=tuple(args.ranks),
        rounds=args.rounds,
        device=args.device,
        json_path=args.json,
        threads=args.num_threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
