"""`make bench`: run every benchmark, write benchmarks/results.json (flat keys) and print a table.

Each benchmark module exposes `run(quick=False) -> dict` whose ratios are measured against a baseline in the same
run. Goals are from the issues; a ratio is "met" when it is on the goal's side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

MODULES = ("bench_ops", "bench_model", "bench_data", "bench_views", "bench_scale", "bench_overhead")
# key -> (comparison, goal): "<=" lower is better, ">=" higher is better.
GOALS = {
    "mask_speedup": (">=", 10.0),
    "mixing_vs_add": ("<=", 1.25),
    "train_step_ratio": ("<=", 1.05),
    "folded_inference_ratio": ("<=", 1.05),
    "dali_vs_torch": (">=", 1.6),
    # One view per copy (b=4, M=2: 8 views per image) against one shared view, loader rates (issue 14).
    "per_copy_cost_pad_random_torch": ("<=", 1.5),
    "per_copy_cost_pad_random_dali": ("<=", 1.5),
    "per_copy_cost_random_resized_torch": ("<=", 3.0),
    "per_copy_cost_random_resized_dali": ("<=", 3.0),
    # ImageNet on hundreds of ranks, by simulation (issue 21): at 1.28M files, and at 4096 against 8 ranks.
    "scale_hit_s_largest": ("<=", 1.0),
    "scale_worker_private_mb_largest": ("<=", 10.0),
    "scale_save_rank0_wmax_vs_w8": ("<=", 2.0),
    "scale_bytes_per_rank_wmax_vs_w8": ("<=", 1.05),
    # The trainer launched as a user launches it against a bare loop doing the same work, wall time (issue 27).
    "overhead_wall_ratio_1r": ("<=", 1.05),
    "overhead_wall_ratio_2r": ("<=", 1.05),
}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} / torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not figures to record)")
    parser.add_argument("--only", nargs="*", default=list(MODULES), choices=MODULES)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}
    for name in args.only:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        for key, value in module.run(quick=args.quick).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                results[key] = value
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'figure':32s} {'value':>10s}  goal")
    for key, value in results.items():
        if isinstance(value, float):
            goal = GOALS.get(key)
            mark = ""
            if goal:
                ok = value <= goal[1] if goal[0] == "<=" else value >= goal[1]
                mark = f"{goal[0]} {goal[1]}  {'met' if ok else 'MISSED'}"
            print(f"{key:32s} {value:10.4g}  {mark}")
    print(f"\nwrote {args.out} ({results['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
