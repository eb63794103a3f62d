"""The main job with real processes: 2-rank gloo training, exact validation, outputs, vanilla path, config errors,
the single-process-world guard."""

from __future__ import annotations

import json

import torch
from conftest import launch_two_machines, read_metrics, run_train, tiny_args, train_cli
from safetensors.torch import load_file


def test_two_rank_training_outputs(reference_run, tiny_data):
    out = reference_run
    run = json.loads((out / "run.json").read_text())
    for key in (
        "world_size",
        "device",
        "mixed_precision",
        "num_params",
        "version",
        "git_commit",
        "classes",
        "normalization",
        "config",
    ):
        assert key in run
    assert run["world_size"] == 2 and len(run["classes"]) == 10
    assert run["config"]["data"]["root"] == str(tiny_data)
    lines = read_metrics(out)
    train = [r for r in lines if r["split"] == "train"]
    val = [r for r in lines if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 19))
    for r in train:
        for key in (
            "loss",
            "lr",
            "img_per_s",
            "loss_member_0",
            "loss_member_1",
            "kappa_mean",
            "cut_share",
            "cut_prob",
            "grad_norm",
            "epoch",
        ):
            assert r[key] is not None, key
    assert 0 < sum(r["cut_share"] for r in train) < len(train)  # both cut and linear batches happened
    # Exact validation: 49 images over 2 ranks, each counted once.
    assert [v["step"] for v in val] == [9, 18]
    assert all(v["count"] == 49 for v in val)
    for v in val:
        assert 0 <= v["top1"] <= 1 and 0 <= v["ece"] <= 1 and len(v["member_top1"]) == 2
    # The best validation so far, beside the last (recorded, never used to pick a checkpoint); a folder's val split.
    best = max(val, key=lambda v: (v["top1"], -v["step"]))
    assert (val[-1]["best_top1"], val[-1]["best_step"], val[-1]["val_split"]) == (best["top1"], best["step"], "val")
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "member_top1_1" in header and "best_top1" in header
    assert len((out / "metrics.csv").read_text().splitlines()) == len(lines) + 1


def test_two_rank_training_learns_and_replicas_agree(reference_run):
    lines = [r for r in read_metrics(reference_run) if r["split"] == "train"]
    first = sum(r["loss"] for r in lines[:4]) / 4
    last = sum(r["loss"] for r in lines[-4:]) / 4
    assert last < first, (first, last)
    ckpt = reference_run / "checkpoints" / "step_00000018"
    prints = [json.loads((ckpt / f"rank_{r}.json").read_text())["param_fingerprint"] for r in range(2)]
    assert prints[0] == prints[1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["shape"]["world_size"] == 2 and state["step"] == 18
    weights = load_file(ckpt / "model.safetensors")
    assert "encoders.1.weight" in weights and "heads.1.weight" in weights


def test_vanilla_path_single_process(tiny_data, tmp_path):
    out = tmp_path / "vanilla"
    args = tiny_args(
        tiny_data,
        out,
        "--mixmo.num_members=1",
        "--mixmo.mixing=none",
        "--mixmo.batch_repetitions=1",
        "--schedule.max_steps=3",
        "--eval.every_n_epochs=100",
    )
    rc, log = run_train(args, nproc=1)
    assert rc == 0, log[-3000:]
    weights = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert not any(k.startswith("encoders.1") for k in weights)
    val = [r for r in read_metrics(out) if r["split"] == "val"]
    assert val[-1]["count"] == 49 and len(val[-1]["member_top1"]) == 1 and val[-1]["diversity"] is None


def test_config_errors_exit_nonzero_naming_the_key(tmp_path):
    cases = {
        "--optim.lrr=0.1": "optim.lrr",
        "--optim.lr=abc": "optim.lr",
        "--data.backend=tpu": "data.backend",
        "--nosuch.key=1": "nosuch",
    }
    for arg, key in cases.items():
        res = train_cli(arg, f"--run.output_dir={tmp_path / 'x'}")
        assert res.returncode == 2, (arg, res.stderr[-2000:])
        assert key in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_sync_bn_on_cpu_is_a_one_line_error_naming_the_key(tiny_data, tmp_path):
    res = train_cli(*tiny_args(tiny_data, tmp_path / "out", "--model.sync_bn=true"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "model.sync_bn" in res.stderr and "CUDA" in res.stderr
    assert not list((tmp_path / "out").glob("checkpoints/step_*"))  # refused before training


def test_missing_data_is_a_clear_error(tmp_path):
    res = train_cli(f"--data.root={tmp_path / 'nope'}", "--data.backend=torch", f"--run.output_dir={tmp_path / 'out'}")
    assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_single_process_world_guard():
    """WORLD_SIZE says 2 but the Accelerator sees one process: refuse instead of training twice."""
    import pytest

    from mixmo_dist.runtime.accelerator import check_world

    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*--multi_gpu"):
        check_world(1, {"WORLD_SIZE": "2"})
    check_world(2, {"WORLD_SIZE": "2"})
    check_world(1, {})


def test_cut_mixmo_with_input_cutmix_trains(tiny_data, tmp_path):
    """The paper's best configuration (Cut-MixMo + CutMix) through the real trainer: finite losses, soft targets."""
    out = tmp_path / "cutmix"
    args = tiny_args(
        tiny_data, out, "--mixmo.input_cutmix_prob=0.5", "--schedule.max_steps=3", "--eval.every_n_epochs=100"
    )
    rc, log = run_train(args, nproc=1)
    assert rc == 0, log[-3000:]
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(train) == 3 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in train)


def test_two_machine_world_on_one_host(tiny_data, tmp_path):
    """Two `accelerate launch` (one per "machine", --same_network) on 127.0.0.1 train one model together."""
    import os

    out = tmp_path / "multinode"
    procs = launch_two_machines(tiny_args(tiny_data, out, "--schedule.max_steps=3"))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-2000:] + logs[1][-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    ckpt = out / "checkpoints" / "step_00000003"
    prints = {json.loads((ckpt / f"rank_{r}.json").read_text())["param_fingerprint"] for r in range(2)}
    assert len(prints) == 1
    assert os.path.exists(ckpt / "COMPLETE")


def test_ema_accumulation_clipping_tensorboard(tiny_data, tmp_path):
    """EMA, gradient accumulation (no_sync on the first micro-batch), clipping and TensorBoard in one 2-rank run."""
    out = tmp_path / "options"
    args = tiny_args(
        tiny_data,
        out,
        "--optim.ema_decay=0.5",
        "--optim.grad_accum_steps=2",
        "--optim.clip_grad_norm=0.5",
        "--log.tensorboard=true",
        "--schedule.max_steps=3",
    )
    rc, log = run_train(args)
    assert rc == 0, log[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["plan"]["grad_accum_steps"] == 2 and run["plan"]["unique_per_step"] == 16
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["grad_norm"] is not None for r in train)
    tensors = load_file(out / "checkpoints" / "step_00000003" / "trainer.safetensors")
    model = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[k], model[k]) for k in model if model[k].dtype.is_floating_point)
    assert list(out.rglob("events.out.tfevents.*"))
