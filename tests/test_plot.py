"""Tests of `python -m mixmo_dist.plot`: PNGs from a synthetic metrics.jsonl and a real evaluation JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixmo_dist import plot
from mixmo_dist.evaluation import plots
from mixmo_dist.evaluation.metrics import EvalAccumulator

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVES = ("curves_loss.png", "curves_lr.png", "curves_throughput.png", "curves_val_top1.png")


def _write_run(run_dir: Path, steps: int = 40) -> None:
    """A metrics.jsonl as the trainer writes it: train lines every step, a val line every 10 steps."""
    lines = []
    for step in range(1, steps + 1):
        loss = 4.0 * math.exp(-step / 15) + 0.5
        lines.append({"split": "train", "step": step, "epoch": step // 10, "loss": loss, "lr": 0.1 * min(1, step / 5),
                      "img_per_s": 900.0 + 10 * (step % 3), "loss_member_0": loss / 2 + 0.01,
                      "loss_member_1": loss / 2 - 0.01, "kappa_mean": 0.5, "cut_share": 0.3, "cut_prob": 0.5,
                      "grad_norm": 1.0})  # fmt: skip
        if step % 10 == 0:
            top1 = 0.2 + step / 100
            lines.append({"split": "val", "step": step, "epoch": step // 10, "top1": top1, "top5": top1 + 0.2,
                          "nll": 2.0 - step / 40, "ece": 0.05, "member_top1": [top1 - 0.02, top1 - 0.03]})  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _write_eval(path: Path) -> dict:
    """An evaluation JSON from a real EvalAccumulator on random, better-than-chance logits."""
    gen = torch.Generator().manual_seed(0)
    labels_N = torch.randint(0, 10, (500,), generator=gen)
    logits_MNK = torch.randn(2, 500, 10, generator=gen) * 3
    logits_MNK[:, torch.arange(500), labels_N] += 3
    acc = EvalAccumulator(2, 10, "cpu")
    acc.update(logits_MNK, labels_N)
    metrics = acc.compute()
    path.write_text(json.dumps(metrics))
    return metrics


def _png_pixels(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    return matplotlib.image.imread(path)


def test_cli_writes_all_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (extra 'plot') is not installed")
    _write_run(tmp_path)
    _write_eval(tmp_path / "eval.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLCONFIGDIR": str(tmp_path / "mpl"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.plot", str(tmp_path), "--eval", str(tmp_path / "eval.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = [*CURVES, "reliability.png"]
    assert sorted(Path(line).name for line in proc.stdout.split()) == sorted(expected)
    images = {}
    for name in expected:
        pixels = _png_pixels(tmp_path / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"  # axes, lines and text, not an empty canvas
        images[name] = pixels
    # Different data gives different pictures (not one figure saved five times).
    assert not any(
        images[a].shape == images[b].shape and (images[a] == images[b]).all()
        for a in expected for b in expected if a < b
    )  # fmt: skip


def test_curves_skip_what_is_not_logged(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (extra 'plot') is not installed")
    records = [{"split": "val", "step": 5, "top1": 0.5, "member_top1": [0.4, 0.45]},
               {"split": "val", "step": 10, "top1": 0.6, "member_top1": [0.5, 0.55]}]  # fmt: skip
    written = plots.plot_curves(records, tmp_path)
    assert [p.name for p in written] == ["curves_val_top1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves_val_top1.png"]
    with pytest.raises(ValueError, match="no plottable metric"):
        plots.plot_curves([{"split": "train", "step": 1, "epoch": 0}], tmp_path)


def test_reliability_diagram_reads_the_accumulator_output(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (extra 'plot') is not installed")
    metrics = _write_eval(tmp_path / "eval.json")
    rel = plots.read_reliability(tmp_path / "eval.json")
    assert rel["count"] == metrics["reliability"]["count"] and sum(rel["count"]) == 500
    assert rel["ece"] == metrics["ece"]
    out = plots.plot_reliability(rel, tmp_path / "reliability.png")
    assert _png_pixels(out).shape[0] > 200


def test_missing_or_empty_or_malformed_metrics_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    assert plot.main([str(tmp_path)]) == 2
    assert f"metrics file {metrics_file} does not exist" in capsys.readouterr().err
    metrics_file.write_text("\n")
    assert plot.main([str(tmp_path)]) == 2
    assert f"metrics file {metrics_file} is empty" in capsys.readouterr().err
    metrics_file.write_text('{"split": "train", "step": 1, "loss": 1.0}\n{"split": "train", "step": 2, "loss": \n')
    assert plot.main([str(tmp_path)]) == 2
    assert f"{metrics_file}:2: not valid JSON" in capsys.readouterr().err
    metrics_file.write_text('{"split": "train", "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected a JSON object with 'split' and 'step'"):
        plots.read_metrics(metrics_file)
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_bad_eval_json_names_the_file_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path, steps=12)
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"top1": 0.5}))
    assert plot.main([str(tmp_path), "--eval", str(bad)]) == 2
    assert f"evaluation file {bad} has no 'reliability' object" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))  # inputs are validated before anything is drawn
    bad.write_text(json.dumps({"reliability": {"bin_lower": [0.0], "bin_upper": [1.0], "accuracy": [1.0]}}))
    with pytest.raises(ValueError, match=r"reliability lacks the list\(s\) \['confidence', 'count'\]"):
        plots.read_reliability(bad)


def test_missing_matplotlib_gives_a_clear_error(tmp_path: Path) -> None:
    _write_run(tmp_path, steps=3)
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as on an install without the extra.
    code = (
        "import sys; sys.modules['matplotlib'] = None; from mixmo_dist.plot import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "needs matplotlib" in proc.stderr and "mixmo_dist[plot]" in proc.stderr
