"""After training: the evaluation CLI (1 and 2 ranks, deep ensembles, temperature scaling, corruptions, user errors),
the export to a plain timm file, and init_from, on real 2-step runs of the trainer on the generated demo set."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ACCELERATE_LAUNCH, read_only_mount, tmpfs_mount
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import save_file

from mixmo_dist.checkpoint import CheckpointError
from mixmo_dist.checkpoint.reader import load_checkpoint, resolve_checkpoint
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.data import Placement, build_data
from mixmo_dist.evaluation.calibration import temperature_scaled_metrics
from mixmo_dist.evaluation.metrics import EvalAccumulator
from mixmo_dist.evaluation.runner import build_folder_val_loader, check_same_classes
from mixmo_dist.export import main as export_main
from mixmo_dist.model import build_model
from mixmo_dist.model.weights import init_from_vanilla

REPO = Path(__file__).resolve().parents[1]
# Every metric the evaluation promises (EvalAccumulator's and the temperature-scaling ones).
REPORTED = (
    "top1 top5 nll ece brier prob_ensemble_top1 prob_ensemble_nll prob_ensemble_ece prob_ensemble_brier member_top1 "
    "member_nll diversity disagreement count reliability temperature calibrated_nll calibrated_ece"
).split()
VENV_BIN = Path(sys.executable).parent
PY = sys.executable


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train(data: Path, out: Path, *extra: str) -> str:
    proc = _run(
        [
            PY,
            "-m",
            "mixmo_dist.train",
            f"--data.root={data}",
            "--data.image_size=32",
            "--data.batch_size=8",
            "--data.num_workers=0",
            "--data.backend=torch",
            "--schedule.epochs=1",
            "--schedule.warmup_epochs=0",
            "--schedule.max_steps=2",
            f"--run.output_dir={out}",
            "--log.progress=lines",
            *extra,
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _evaluate(*args: str, nproc: int = 1) -> dict:
    if nproc == 1:
        cmd = [PY, "-m", "mixmo_dist.evaluate", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            *ACCELERATE_LAUNCH,
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "-m",
            "mixmo_dist.evaluate",
            *args,
        ]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # one JSON object, from rank 0 only
    return json.loads(lines[0])


def _last_val(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["split"] == "val"][-1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("after") / "demo"
    proc = _run(
        [PY, "-m", "mixmo_dist.data.demo", "--out", str(root), "--train-per-class", "8", "--val-per-class", "4"]
    )
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def run_a(demo, tmp_path_factory) -> Path:
    """A 2-member Cut-MixMo resnet18, 2 steps."""
    out = tmp_path_factory.mktemp("run_a")
    _train(demo, out)
    return out


@pytest.fixture(scope="module")
def exported(run_a, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "a.safetensors"
    assert export_main(["--checkpoint", str(run_a), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        return out, dict(f.metadata())


@pytest.fixture(scope="module")
def run_b(demo, exported, tmp_path_factory) -> tuple[Path, str]:
    """A vanilla (1-member) run started by the trainer from the export of run A (model.init_from)."""
    out = tmp_path_factory.mktemp("run_b")
    log = _train(
        demo,
        out,
        "--mixmo.num_members=1",
        "--mixmo.mixing=none",
        "--mixmo.batch_repetitions=1",
        f"--model.init_from={exported[0]}",
    )
    return out, log


@pytest.fixture(scope="module")
def corruptions(demo, tmp_path_factory) -> Path:
    """ImageNet-C style tree from the val images: identity/1 (unchanged copies), blur/1 and blur/2."""
    root = tmp_path_factory.mktemp("corrupt")
    for name, severity, radius in (("identity", "1", 0), ("blur", "1", 1), ("blur", "2", 3)):
        for src in sorted((demo / "val").rglob("*.JPEG")):
            dst = root / name / severity / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if radius == 0:
                shutil.copyfile(src, dst)
            else:
                Image.open(src).filter(ImageFilter.GaussianBlur(radius)).save(dst, quality=90)
    return root


@pytest.fixture(scope="module")
def ensemble_eval(run_a, run_b, corruptions, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "deep" / "result.json"
    result = _evaluate(
        "--checkpoint",
        str(run_a),
        "--checkpoint",
        str(run_b[0]),
        "--temperature-scale",
        "--corruptions",
        str(corruptions),
        "--out",
        str(out),
    )
    return result, out


# ----------------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------------


def test_export_metadata_and_timm_loading_equal_the_ensemble(run_a, exported):
    file, meta = exported
    umask = os.umask(0o022)
    os.umask(umask)
    assert file.stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone writes 0o600
    run_json = json.loads((run_a / "run.json").read_text())
    step_dir = resolve_checkpoint(run_a)
    assert meta["format"] == "timm" and meta["arch"] == "resnet18" and meta["num_classes"] == "10"
    assert json.loads(meta["classes"]) == run_json["classes"]
    assert json.loads(meta["mean"]) == run_json["normalization"]["mean"]
    assert json.loads(meta["std"]) == run_json["normalization"]["std"]
    assert meta["source_checkpoint"] == str(step_dir.resolve())
    plain = timm.create_model(
        "resnet18", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=10)
    ).eval()
    mixmo = load_checkpoint(step_dir).model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ensemble_mean = mixmo(x).mean(0)
        torch.testing.assert_close(plain(x), ensemble_mean, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mixmo(x)[0], mixmo(x)[1])  # the two members really differ


_LOAD_HUB = """
import sys, timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save({"logits": model(x), "cfg": dict(model.pretrained_cfg)}, sys.argv[2])
"""


def test_hub_export_loads_in_a_fresh_timm_process_with_the_ensembles_logits(run_a, tmp_path, capsys):
    """(issue 24) `--hub-dir`: config.json, model.safetensors and a model card; `timm.create_model("local-dir:...",
    pretrained=True)` in a process that never imported mixmo_dist gives the ensemble's mean logits."""
    hub = tmp_path / "hub" / "resnet18-mixmo"
    assert export_main(["--checkpoint", str(run_a), "--hub-dir", str(hub)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in hub.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((hub / "config.json").read_text())
    run_json = json.loads((run_a / "run.json").read_text())
    assert printed["hub_dir"] == str(hub) and printed["architecture"] == config["architecture"] == "resnet18"
    assert config["num_classes"] == 10 and config["label_names"] == run_json["classes"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_pct"] == 0.875
    assert pcfg["mean"] == run_json["normalization"]["mean"] and pcfg["std"] == run_json["normalization"]["std"]
    script = tmp_path / "load_hub.py"
    script.write_text(_LOAD_HUB)
    logits_file = tmp_path / "logits.pt"
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}  # plain timm: mixmo_dist cannot be imported there
    res = subprocess.run([PY, str(script), str(hub), str(logits_file)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = torch.load(logits_file)
    assert list(loaded["cfg"]["input_size"]) == [3, 32, 32] and list(loaded["cfg"]["mean"]) == pcfg["mean"]
    mixmo = load_checkpoint(resolve_checkpoint(run_a)).model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], mixmo(x).mean(0), rtol=1e-4, atol=1e-5)
    card = (hub / "README.md").read_text()
    last = _last_val(run_a)
    assert "library_name: timm" in card and f"| top1 | {last['top1']} |" in card
    assert f"| step | {last['step']} |" in card and f"| best_top1 | {last['best_top1']} |" in card
    # a second export never replaces a folder that holds files
    assert export_main(["--checkpoint", str(run_a), "--hub-dir", str(hub)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("kind", ["hub-dir", "out"])
def test_an_export_onto_a_full_disk_is_one_line_leaves_nothing_and_works_once_space_is_freed(
    run_a, tmp_path, capsys, kind
):
    """A real tmpfs with 1 MiB left: the folded resnet18 (~45 MB) does not fit. One line naming the target and the
    cause (safetensors raises its own error for a failed write, not an OSError), no partial file or temporary
    folder; once space is freed, the same command writes the export."""
    with tmpfs_mount(tmp_path / "disk", "64m") as disk:
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_bsize - (1 << 20)))
        target = disk / "exports" / ("hub" if kind == "hub-dir" else "folded.safetensors")
        command = ["--checkpoint", str(run_a), f"--{kind}", str(target)]
        capsys.readouterr()
        assert export_main(command) == 2
        captured = capsys.readouterr()
        assert (
            captured.err
            == f"error: cannot write --{kind} {target} (No space left on device); choose a writable place\n"
        )
        assert captured.out == "" and sorted(p.name for p in disk.rglob("*")) == ["exports", "filler"]
        (disk / "filler").unlink()
        assert export_main(command) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["mixmo"] if kind == "hub-dir" else printed)["source_weights"] == "raw"  # run_a has no EMA
        written = target / "model.safetensors" if kind == "hub-dir" else target
        with safe_open(str(written), "pt") as f:
            assert "fc.weight" in f.keys()


def test_export_errors_exit_2(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "error: checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------------------------


def test_deep_ensemble_evaluation(run_a, run_b, ensemble_eval):
    result, out = ensemble_eval
    assert json.loads(out.read_text()) == result  # --out holds the same object as stdout
    assert result["num_members"] == 3 and result["members_per_network"] == [2, 1] and result["count"] == 40
    assert set(REPORTED) <= set(result), sorted(set(REPORTED) - set(result))
    # Members are exactly what the trainer measured for each network at its last evaluation.
    val_a, val_b = _last_val(run_a), _last_val(run_b[0])
    assert result["member_top1"] == pytest.approx(val_a["member_top1"] + val_b["member_top1"], abs=1e-12)
    assert result["member_nll"] == pytest.approx(val_a["member_nll"] + val_b["member_nll"], rel=1e-9)
    # The ensemble (mean of all 3 member logits) and its calibration, recomputed here from the checkpoints.
    loaded = [load_checkpoint(resolve_checkpoint(p)) for p in (run_a, run_b[0])]
    cfg = loaded[0].config
    norm = json.loads((run_a / "run.json").read_text())["normalization"]
    place = Placement(
        unique_per_rank=1,
        val_batch_size=16,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("cpu"),
        mean=norm["mean"],
        std=norm["std"],
    )
    data = build_data(cfg.data, place)
    acc = EvalAccumulator(3, 10, "cpu")
    logits, labels = [], []
    with torch.no_grad():
        for images, y in data.val:
            member_logits = torch.cat([item.model(images) for item in loaded])
            acc.update(member_logits, y)
            logits.append(member_logits.mean(0))
            labels.append(y)
    expected = acc.compute()
    for key in ("top1", "top5", "nll", "ece", "brier", "diversity", "disagreement"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    calibrated = temperature_scaled_metrics(torch.cat(logits)[None], torch.cat(labels))
    assert result["temperature"] == pytest.approx(calibrated["temperature"], rel=1e-4)
    assert result["calibrated_nll"] == pytest.approx(calibrated["calibrated_nll"], rel=1e-4)


def test_corruptions(ensemble_eval):
    result, _ = ensemble_eval
    table = result["corruptions"]
    assert sorted(table) == ["blur", "identity"] and sorted(table["blur"]) == ["1", "2"]
    # Unchanged copies of the val split give exactly the clean metrics.
    for key in ("top1", "nll", "ece"):
        assert table["identity"]["1"][key] == pytest.approx(result[key], abs=1e-12)
    assert table["blur"]["2"]["nll"] != pytest.approx(result["nll"], abs=1e-6)  # blurring changed the predictions
    cells = [table["identity"]["1"], table["blur"]["1"], table["blur"]["2"]]
    for key in ("top1", "nll", "ece"):
        assert result[f"corruption_mean_{key}"] == pytest.approx(sum(c[key] for c in cells) / 3)


def test_two_ranks_give_the_same_result(run_a, run_b, ensemble_eval):
    single, _ = ensemble_eval
    double = _evaluate("--checkpoint", str(run_a), "--checkpoint", str(run_b[0]), "--temperature-scale", nproc=2)
    assert double["world_size"] == 2 and double["count"] == single["count"] == 40
    for key in (
        "top1",
        "top5",
        "nll",
        "ece",
        "brier",
        "prob_ensemble_nll",
        "diversity",
        "disagreement",
        "calibrated_nll",
        "calibrated_ece",
        "temperature",
    ):
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    assert double["member_top1"] == pytest.approx(single["member_top1"])
    assert double["reliability"]["count"] == single["reliability"]["count"]


def test_folder_loader_reads_any_split_with_the_checkpoint_classes(run_a, demo, tmp_path):
    """What `--split NAME` and `--corruptions` use: the torch val transform over DIR/<split>/<class>/."""
    loaded = load_checkpoint(resolve_checkpoint(run_a))
    place = Placement(
        unique_per_rank=1,
        val_batch_size=16,
        rank=1,
        world_size=2,
        seed=0,
        device=torch.device("cpu"),
        channels_last=False,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    loader = build_folder_val_loader(demo, "train", loaded.classes, loaded.config.data, place)
    labels = torch.cat([y for _, y in loader])
    assert labels.shape == (40,)  # rank 1 of 2 reads half of the 80 train images
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    (tmp_path / "extra" / "not_a_class").mkdir(parents=True)
    shutil.copytree(demo / "val", tmp_path / "extra", dirs_exist_ok=True)
    with pytest.raises(ValueError, match="not_a_class"):
        build_folder_val_loader(tmp_path, "extra", loaded.classes, loaded.config.data, place)


def test_cli_user_error_exits_2(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = _run([PY, "-m", "mixmo_dist.evaluate", "--checkpoint", str(missing)])
    assert proc.returncode == 2
    assert f"error: checkpoint {missing}: no such file or directory" in proc.stderr
    assert proc.stdout == ""


def test_corrupt_checkpoint_and_class_mismatch_are_named(run_a, tmp_path):
    step_dir = resolve_checkpoint(run_a)
    assert step_dir.name == "step_00000002"
    # A modified weight file fails its sha256: the step dir is refused, the run dir has no complete checkpoint left.
    bad_run = tmp_path / "bad_run"
    bad_step = bad_run / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, bad_step)
    with open(bad_step / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=f"{bad_step}.*sha256 mismatch for model.safetensors"):
        resolve_checkpoint(bad_step)
    with pytest.warns(UserWarning, match=f"{bad_step} is not usable .*sha256 mismatch.*skipped"):
        with pytest.raises(CheckpointError, match=f"run directory {bad_run} holds no complete checkpoint"):
            resolve_checkpoint(bad_run)
    assert bad_step.is_dir()  # a reader moves nothing aside
    # A valid checkpoint of a network trained on the same classes in another order cannot join the ensemble.
    store = CheckpointStore(tmp_path / "other" / "checkpoints", keep_last=1)
    tmp = store.begin(2)
    source = CheckpointStore(step_dir.parent, keep_last=1)
    store.write_tensors(tmp, "model.safetensors", source.read_tensors(step_dir, "model.safetensors"))
    state = source.read_json(step_dir, "state.json")
    state["shape"]["classes"] = list(reversed(state["shape"]["classes"]))
    store.write_json(tmp, "state.json", state)
    other = store.commit(tmp, 2)
    loaded = [load_checkpoint(step_dir), load_checkpoint(resolve_checkpoint(other))]
    with pytest.raises(ValueError, match=f"{step_dir} and {other}.*another order"):
        check_same_classes(loaded)


# ----------------------------------------------------------------------------------------------------------------
# Reading a read-only run.
# ----------------------------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under `root`."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def run_with_corrupt_latest(run_a, tmp_path) -> Path:
    """A copy of run A whose newest checkpoint (step 3, named by `latest`) has a damaged weight file."""
    copy = tmp_path / "copy"
    shutil.copytree(run_a, copy)
    root = copy / "checkpoints"
    bad = root / "step_00000003"
    shutil.copytree(root / "step_00000002", bad)
    marker = json.loads((bad / "COMPLETE").read_text())
    (bad / "COMPLETE").write_text(json.dumps({**marker, "step": 3}))
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    (root / "latest").write_text("step_00000003\n")
    return copy


def test_evaluate_export_plot_read_a_read_only_run_and_skip_its_corrupt_checkpoint(run_with_corrupt_latest, tmp_path):
    """A shared results directory: evaluate and export fall back to the previous complete checkpoint with a warning,
    write only where --out says, and change nothing in the run (checked on a read-only bind mount and by content)."""
    before = _tree(run_with_corrupt_latest)
    outs = tmp_path / "outs"
    with read_only_mount(tmp_path / "ro", source=run_with_corrupt_latest) as ro:
        skipped = f"checkpoint {ro / 'checkpoints' / 'step_00000003'} is not usable (sha256 mismatch"
        evaluation = _run([PY, "-m", "mixmo_dist.evaluate", "--checkpoint", str(ro), "--out", str(outs / "e.json")])
        export = _run([PY, "-m", "mixmo_dist.export", "--checkpoint", str(ro), "--out", str(outs / "x.safetensors")])
        plot = _run([PY, "-m", "mixmo_dist.plot", str(ro), "--out", str(outs / "plots")])
        plot_in_place = _run([PY, "-m", "mixmo_dist.plot", str(ro)])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert skipped in evaluation.stderr and "Traceback" not in evaluation.stderr
    assert re.search(r"^\S+ WARNING checkpoint \S+step_00000003 is not usable", evaluation.stderr, re.M)  # a log line
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["steps"] == [2] and result["checkpoints"] == [str(ro / "checkpoints" / "step_00000002")]
    assert json.loads((outs / "e.json").read_text()) == result
    assert export.returncode == 0, export.stderr[-3000:]
    assert skipped in export.stderr
    assert json.loads(export.stdout)["source_step"] == "2"
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert sorted(p.name for p in (outs / "plots").iterdir()) == sorted(Path(line).name for line in plot.stdout.split())
    assert plot_in_place.returncode == 2
    assert plot_in_place.stderr.count("\n") == 1 and "pass --out DIR" in plot_in_place.stderr, plot_in_place.stderr
    assert _tree(run_with_corrupt_latest) == before


def test_unwritable_out_is_one_line_after_the_result(run_a, tmp_path):
    with read_only_mount(tmp_path / "ro"):
        evaluation = _run(
            [PY, "-m", "mixmo_dist.evaluate", "--checkpoint", str(run_a), "--out", str(tmp_path / "ro/e")]
        )
        export = _run(
            [PY, "-m", "mixmo_dist.export", "--checkpoint", str(run_a), "--out", str(tmp_path / "ro/x.safetensors")]
        )
    assert evaluation.returncode == 2 and json.loads(evaluation.stdout)["steps"] == [2]
    assert [line for line in evaluation.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write --out {tmp_path / 'ro/e'} (Read-only file system); the result is on stdout above"
    ]
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert f"error: cannot write --out {tmp_path / 'ro/x.safetensors'} (Read-only file system)" in export.stderr


# ----------------------------------------------------------------------------------------------------------------
# init_from.
# ----------------------------------------------------------------------------------------------------------------


def _vanilla_resnet18(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(3)
    net = timm.create_model("resnet18", num_classes=num_classes)
    for module in net.modules():  # BN statistics away from their init, so a dropped buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_init_from_timm_state_dict_matches_vanilla(kind, tmp_path):
    vanilla = _vanilla_resnet18()
    path = tmp_path / f"vanilla.{kind}"
    if kind == "pth":
        torch.save({"state_dict": vanilla.state_dict()}, path)  # nested, as timm's train script saves it
    else:
        save_file(vanilla.state_dict(), str(path))
    model = build_model("resnet18", 3, 10)
    init_from_vanilla(model, str(path))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = vanilla(x)
        members = model(x)
        torch.testing.assert_close(members.mean(0), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(members[2], want, rtol=1e-4, atol=1e-5)  # every head starts as the vanilla one
    torch.testing.assert_close(model.encoders[1].weight * 3, vanilla.conv1.weight)
    assert int(model.core.bn1.num_batches_tracked) == 7


def test_init_from_export_and_from_a_one_member_run(run_b, exported):
    run_dir, log = run_b
    # The trainer took model.init_from (the export of run A) before its 2 steps.
    assert f"initialised resnet18 (M=1) from vanilla weights {exported[0]}" in log
    x = torch.randn(2, 3, 32, 32)
    from_file = build_model("resnet18", 2, 10)
    init_from_vanilla(from_file, str(exported[0]))
    plain = timm.create_model(
        "resnet18", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(exported[0]), num_classes=10)
    ).eval()
    from_run = build_model("resnet18", 2, 10)
    init_from_vanilla(from_run, str(run_dir))
    vanilla_b = load_checkpoint(resolve_checkpoint(run_dir)).model
    with torch.no_grad():
        torch.testing.assert_close(from_file.eval()(x).mean(0), plain(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_run.eval()(x).mean(0), vanilla_b(x)[0], rtol=1e-4, atol=1e-5)


def test_init_from_errors_name_file_and_key(run_a, exported, tmp_path):
    with pytest.raises(ValueError, match=f"model.init_from={exported[0]}: key arch is 'resnet18'"):
        init_from_vanilla(build_model("resnet34", 2, 10), str(exported[0]))
    small = tmp_path / "five.pth"
    torch.save(_vanilla_resnet18(num_classes=5).state_dict(), small)
    with pytest.raises(ValueError, match=f"{small}: key 'fc.bias' has shape \\(5,\\)"):
        init_from_vanilla(build_model("resnet18", 2, 10), str(small))
    with pytest.raises(ValueError, match="key num_members is 2"):
        init_from_vanilla(build_model("resnet18", 2, 10), str(run_a))
    r34 = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34", num_classes=10).state_dict(), r34)
    with pytest.raises(ValueError, match=f"{r34}: unexpected key 'layer1.2"):
        init_from_vanilla(build_model("resnet18", 2, 10), str(r34))
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        init_from_vanilla(build_model("resnet18", 2, 10), str(text))


# ----------------------------------------------------------------------------------------------------------------
# OOD detection and selective prediction (issue 23).
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory) -> Path:
    """An image folder of 2 classes outside the training set: 7 uniform-noise JPEGs each (14 images, not a multiple
    of 2 ranks' batches)."""
    import numpy as np

    root = tmp_path_factory.mktemp("ood") / "noise"
    rng = np.random.default_rng(0)
    for name in ("noise_a", "noise_b"):
        (root / name).mkdir(parents=True)
        for i in range(7):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.JPEG", quality=90)
    return root


def test_ood_and_selective_metrics_are_exact_over_ranks(run_a, ood_dir):
    one = _evaluate("--checkpoint", str(run_a), "--ood", str(ood_dir))
    two = _evaluate("--checkpoint", str(run_a), "--ood", str(ood_dir), nproc=2)
    assert one["ood"]["num_images"] == 14 and one["ood"]["dir"] == str(ood_dir)
    # Every sample scored once over the ranks, in and out of distribution: the exactness claim.
    assert one["ood"]["num_scored"] == two["ood"]["num_scored"] == 14
    assert one["selective_count"] == two["selective_count"] == one["count"] == 40
    # The ranks' batches differ from one process's, so a convolution's float rounding may differ (1e-7), and a 2-step
    # model's scores are near-ties that such noise could swap: ranking metrics are compared to a swap or two.
    for score in ("msp", "entropy", "disagreement"):
        for metric in ("auroc", "aupr", "fpr95"):
            assert 0.0 <= one["ood"][score][metric] <= 1.0, (score, metric)
            assert two["ood"][score][metric] == pytest.approx(one["ood"][score][metric], abs=0.05), (score, metric)
    for metric in ("aurc", "risk_at_80"):
        assert 0.0 <= one[metric] <= 1.0
        assert two[metric] == pytest.approx(one[metric], abs=0.05)
    # msp and entropy rank differently, so their figures are two measurements, not one copied
    assert one["ood"]["msp"] != one["ood"]["entropy"] or one["ood"]["msp"] != one["ood"]["disagreement"]
    assert "ood" not in _evaluate("--checkpoint", str(run_a))  # only with --ood


# ----------------------------------------------------------------------------------------------------------------
# ResNet-v2 / BiT (issue 24): a 1x1-conv classifier and a weight-standardised stem in export and init_from.
# ----------------------------------------------------------------------------------------------------------------


def _loaded(net, tmp_path: Path):
    """A LoadedCheckpoint around an in-memory MixMoNet (what load_checkpoint returns, without a training run)."""
    from mixmo_dist.checkpoint.reader import LoadedCheckpoint
    from mixmo_dist.config import Config

    shape = {
        "arch": net.arch,
        "num_members": net.num_members,
        "num_classes": net.num_classes,
        "classes": [f"c{i}" for i in range(net.num_classes)],
    }
    return LoadedCheckpoint(tmp_path, 3, Config(), shape, net.eval(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize(("arch", "members"), [("resnetv2_18", 2), ("resnetv2_50x1_bit", 1)])
def test_resnetv2_exports_load_in_timm_with_the_ensembles_logits(arch, members, tmp_path):
    """A 1x1-conv classifier folds into timm's [K,D,1,1] weight, and config.json names it (`head.fc`); a 1-member
    BiT keeps timm's own StdConv2d stem: both timm loaders give the ensemble's mean logits."""
    from mixmo_dist.model.weights import export_folded, export_hub

    torch.manual_seed(0)
    net = build_model(arch, members, 4)
    loaded = _loaded(net, tmp_path)
    config = export_hub(loaded, tmp_path / "hub")
    assert config["pretrained_cfg"]["classifier"] == "head.fc"
    export_folded(loaded, tmp_path / "folded.safetensors")
    from_hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    from_file = timm.create_model(
        arch,
        num_classes=4,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "folded.safetensors"), num_classes=4),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net(x).mean(0)
        torch.testing.assert_close(from_hub(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_file(x), want, rtol=1e-4, atol=1e-5)


def test_a_multi_member_bit_export_is_refused_in_one_line_naming_the_reason(tmp_path):
    """BiT with M > 1: the folded stem is a plain conv holding the sum of standardised weights, which timm's StdConv2d
    would standardise again; both exports refuse, write nothing, and say why in one line."""
    from mixmo_dist.model.weights import export_folded, export_hub

    loaded = _loaded(build_model("resnetv2_50x1_bit", 2, 4), tmp_path)
    for export, out in ((export_folded, tmp_path / "f.safetensors"), (export_hub, tmp_path / "hub")):
        with pytest.raises(ValueError, match="cannot export resnetv2_50x1_bit with M=2: .*StdConv2d.*fold") as err:
            export(loaded, out)
        assert "\n" not in str(err.value) and not out.exists()


def test_init_from_a_one_member_resnetv2_run_reshapes_its_head(tmp_path):
    """A 1-member run stores its head as a [K,D] Linear; BiT/ResNet-v2's timm classifier is [K,D,1,1]: init_from of
    such a run maps one to the other, and the members' mean logits start equal to the run's."""
    torch.manual_seed(2)
    vanilla = build_model("resnetv2_18", 1, 4).eval()
    with torch.no_grad():
        vanilla.heads[0].bias.uniform_(-1.0, 1.0)
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep_last=1)
    tmp = store.begin(5)
    store.write_tensors(tmp, "model.safetensors", vanilla.state_dict())
    store.write_json(tmp, "state.json", {"shape": {"num_members": 1, "arch": "resnetv2_18"}})
    step_dir = store.commit(tmp, 5)
    net = build_model("resnetv2_18", 2, 4)
    init_from_vanilla(net, str(step_dir))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x).mean(0), vanilla(x)[0], rtol=1e-4, atol=1e-5)
