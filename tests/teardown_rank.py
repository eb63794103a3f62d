"""One rank that builds the run's Accelerator, an optimizer and a collective, tears down, and reports what is left
(run by tests/test_teardown.py).

    python -m teardown_rank <report_dir>

Writes `<report_dir>/rank<r>.json`: whether torch._dynamo was imported before the Accelerator, and the names of the
threads left once `end_training` returned (gloo's `pt_gloo_runloop`/`gloo_tcp_loop` must be gone by then).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(report_dir: str) -> None:
    dynamo_before = "torch._dynamo" in sys.modules
    from mixmo_dist.runtime.accelerator import build_accelerator

    accelerator = build_accelerator("no", output_dir=report_dir)
    w = torch.nn.Parameter(torch.ones(2))
    torch.optim.SGD([w], lr=0.1)  # the first optimizer imports torch._dynamo if nothing did before
    x = torch.ones(2)
    dist.all_reduce(x)
    accelerator.end_training()
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    report = {"dynamo_before": dynamo_before, "sum": x.tolist(), "threads": threads}
    (Path(report_dir) / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
