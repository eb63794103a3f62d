"""`make demo`'s script (scripts/launch_demo.sh): Cut-MixMo with one view per copy and a vanilla baseline on the same
data and schedule, then the comparison table (issue 23). Run here on the tiny JPEG set for 2 steps each; the demo's
own figures and time are in README.md."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from conftest import REPO, train_env

pytestmark = pytest.mark.slow


def test_the_demo_trains_both_networks_alike_and_ends_with_their_table(tiny_data, tmp_path):
    out = tmp_path / "demo"
    words = [f"--data.root={tiny_data}", "--data.image_size=32", "--data.backend=torch", "--data.num_workers=1",
             "--schedule.max_steps=2", "--schedule.warmup_epochs=0", "--log.progress=lines",
             "--model.arch=test_resnet"]  # timm's 0.37M-parameter ResNet: the demo's plumbing is checked  # fmt: skip
    res = subprocess.run(["bash", "scripts/launch_demo.sh", *words], cwd=REPO, capture_output=True, text=True,
                         env=train_env(DEMO_OUT=str(out), NPROC_DEMO="2"), timeout=900)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in ("cutmixmo", "vanilla")}
    mixmo, vanilla = configs["cutmixmo"], configs["vanilla"]
    assert (mixmo["mixmo"]["num_members"], mixmo["mixmo"]["mixing"], mixmo["data"]["copy_augmentation"]) == (
        2, "cut", "per_copy")  # fmt: skip
    assert (vanilla["mixmo"]["num_members"], vanilla["mixmo"]["mixing"], vanilla["mixmo"]["batch_repetitions"]) == (
        1, "none", 1)  # fmt: skip
    # the same unique images per step, data, schedule and learning rate
    unique = {n: c["data"]["batch_size"] // c["mixmo"]["batch_repetitions"] for n, c in configs.items()}
    assert unique["cutmixmo"] == unique["vanilla"] == 32
    for section, key in (("data", "root"), ("schedule", "epochs"), ("schedule", "max_steps"), ("optim", "lr"),
                         ("run", "seed"), ("data", "image_size")):  # fmt: skip
        assert mixmo[section][key] == vanilla[section][key], (section, key)
    for name in configs:  # both trained to the end
        assert (out / name / "checkpoints" / "step_00000002").is_dir(), name
    table = (out / "compare" / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "group" not in line]
    assert len(rows) == 2 and "mixmo.num_members=2" in rows[0] and "mixmo.num_members=1" in rows[1], table
    assert table.strip() in res.stdout  # the demo ends by printing it
    assert (out / "compare" / "compare.png").stat().st_size > 0
