"""Benchmark: what MixMo costs over one network, and what the data loader costs the trainer.

Ratios, each of medians over repeats with the two sides taking turns (this machine is noisy):

- `train_step_ratio`: one MixMo-ResNet-50 (M=2) train step (member inputs, sampling, forward, reweighted loss,
  backward, SGD) / one vanilla timm ResNet-50 step (forward, CE, backward, SGD) on the same rows, bf16 autocast,
  channels_last. CPU: small images so it finishes in minutes. Goal <= 1.05.
- `folded_inference_ratio`: the folded MixMo network's forward / vanilla ResNet-50's (goal <= 1.05: same net).
- `ensemble_inference_ratio`: the unfolded MixMo eval forward (M heads) / vanilla ResNet-50's.
- `synthetic_vs_real`: trainer images/s on the synthetic backend / on JPEGs through the default loader (the demo
  data), the same Trainer in this process: above 1 means the loader slows training down.

    python -m benchmarks.bench_model [--quick]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from benchmarks import quick_main
from mixmo_dist.model import build_model
from mixmo_dist.ops import sample_mixing
from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_inputs

__all__ = ["run"]


def _turns(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call; the functions take turns so drift hits both sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_fns(rows: int, size: int, device: torch.device, dtype: torch.dtype):
    cl = torch.channels_last
    mixmo = build_model("resnet50", 2, 1000).to(device, memory_format=cl)
    vanilla = timm.create_model("resnet50", num_classes=1000).to(device, memory_format=cl)
    opt_m = torch.optim.SGD(mixmo.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    opt_v = torch.optim.SGD(vanilla.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    g = torch.Generator(device=device).manual_seed(0)
    unique = rows // 2
    images = torch.randn(unique, 3, size, size, device=device).contiguous(memory_format=cl)
    labels = torch.randint(0, 1000, (unique,), device=device)
    rows_images = torch.cat([images, images]).contiguous(memory_format=cl)
    rows_labels = torch.cat([labels, labels])
    autocast = torch.autocast(device.type, dtype=dtype)

    def mixmo_step():
        x, y = member_inputs(images, labels, num_members=2, repetitions=2, input_repetition=0.0, generator=g)
        h, w = mixmo.encoder_output_hw(size, size)
        mix = sample_mixing(rows, 2, h, w, mixing="cut", alpha=2.0, cut_prob=0.5, generator=g, device=device)
        with autocast:
            logits = mixmo(x, mix)
        loss, _ = mixmo_loss(logits, y, reweight(mix.lam_MB, 3.0))
        loss.backward()
        opt_m.step()
        opt_m.zero_grad(set_to_none=True)

    def vanilla_step():
        with autocast:
            logits = vanilla(rows_images)
        F.cross_entropy(logits.float(), rows_labels).backward()
        opt_v.step()
        opt_v.zero_grad(set_to_none=True)

    return mixmo, vanilla, mixmo_step, vanilla_step, rows_images, autocast


def model_ratios(quick: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, size, repeats = (8, 64, 3) if quick else (32, 96, 7)
    if device.type == "cuda":
        rows, size, repeats = 256, 224, 20
    mixmo, vanilla, mixmo_step, vanilla_step, x, autocast = _step_fns(rows, size, device, torch.bfloat16)
    train = _turns({"mixmo": mixmo_step, "vanilla": vanilla_step}, repeats)
    mixmo.eval()
    vanilla.eval()
    folded = mixmo.fold().to(memory_format=torch.channels_last).eval()

    def infer(model):
        def fn():
            with torch.no_grad(), autocast:
                model(x)

        return fn

    inf = _turns({"vanilla": infer(vanilla), "folded": infer(folded), "ensemble": infer(mixmo)}, repeats)
    return {
        "train_step_ratio": train["mixmo"] / train["vanilla"],
        "train_step_mixmo_ms": 1e3 * train["mixmo"],
        "train_step_vanilla_ms": 1e3 * train["vanilla"],
        "folded_inference_ratio": inf["folded"] / inf["vanilla"],
        "ensemble_inference_ratio": inf["ensemble"] / inf["vanilla"],
        "model_bench_rows": rows,
        "model_bench_image_size": size,
    }


def synthetic_vs_real(quick: bool) -> dict:
    """The Trainer, in this process, on synthetic tensors and on the demo JPEGs (default backend)."""
    from mixmo_dist.config import load_config
    from mixmo_dist.data.demo import main as demo_main
    from mixmo_dist.runtime.accelerator import build_accelerator
    from mixmo_dist.training.trainer import Trainer

    root = Path("data/demo")
    if not (root / "train").exists():
        demo_main(["--out", str(root)])
    steps = 6 if quick else 20
    rates: dict[str, list[float]] = {}
    accelerator = build_accelerator("auto", output_dir=tempfile.gettempdir())
    # ABBA order: the first run absorbs the process's warm-up and a drift in machine load hits both sides alike
    # (a single synthetic-then-real pair once gave 0.13, synthetic looking 8x slower than decoding JPEGs).
    for backend in ("auto", "synthetic", "synthetic", "auto"):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(
                [
                    f"--data.root={root}",
                    f"--data.backend={backend}",
                    f"--run.output_dir={out}",
                    f"--schedule.max_steps={steps}",
                    "--log.every_n_steps=1",
                    "--log.progress=lines",
                    "--eval.at_end=false",
                    "--eval.every_n_epochs=100",
                    "--checkpoint.every_n_minutes=null",
                ]
            )
            trainer = Trainer(cfg, accelerator)
            try:
                trainer.fit()
                backend_name = trainer.data.backend
            finally:
                trainer.close()
            lines = [json.loads(s) for s in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            median = statistics.median(r["img_per_s"] for r in lines[2:] if r["split"] == "train")
            rates.setdefault(backend_name, []).append(median)
    real = next(k for k in rates if k != "synthetic")
    synthetic_rate, real_rate = statistics.mean(rates["synthetic"]), statistics.mean(rates[real])
    return {
        "synthetic_vs_real": synthetic_rate / real_rate,
        "synthetic_img_per_s": synthetic_rate,
        "real_img_per_s": real_rate,
        "real_backend": real,
        "runs_img_per_s": rates,
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    result = model_ratios(quick)
    result.update(synthetic_vs_real(quick))
    for key, value in result.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    return result


def main(argv: list[str] | None = None) -> int:
    return quick_main(run, "python -m benchmarks.bench_model", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
