"""A rank's process group is gone once the run tears down, so nothing of gloo runs into interpreter shutdown.

Left alive, gloo's worker threads free a finished collective's tensors while the interpreter shuts down and abort the
rank with "terminate called without an active exception" (exit -6) after its work was done: the launcher then
reports a failed run (seen in CI, about one run in six with 3 ranks).
"""

from __future__ import annotations

import json

from conftest import run_train


def test_no_gloo_thread_outlives_end_training_after_an_optimizer_imported_dynamo(tmp_path):
    rc, log = run_train([str(tmp_path)], nproc=2, module="teardown_rank", timeout=300)
    assert rc == 0, log[-4000:]
    for r in range(2):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert report["sum"] == [2.0, 2.0]
        assert not report["dynamo_before"], "torch._dynamo was imported before build_accelerator: nothing is tested"
        assert not [t for t in report["threads"] if "gloo" in t], report["threads"]
