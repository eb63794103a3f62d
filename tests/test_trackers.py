"""Experiment trackers through Accelerate (`log.trackers`): a real MLflow tracking server on 127.0.0.1 and W&B in
offline mode, read back through MlflowClient and the offline run's own `.wandb` file, across an aborted run and its
resume; a tracking server that accepts connections and never answers (training ends normally, a resume sends every
step once); a send that raises; a missing package refused in one line before training starts."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import read_metrics, run_train, tiny_args, train_env

from mixmo_dist.runtime.accelerator import check_trackers

# Before mlflow is imported in this process (the in-process test): MLflow 3 sends usage telemetry by default.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
mlflow = pytest.importorskip("mlflow")  # the 'trackers' extra: `make venv` installs it, so CI runs these tests
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

# Nothing leaves this machine: no telemetry, W&B offline with its settings and caches in the test's directory.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port, its store (SQLite) and artifacts in a temporary directory."""
    from conftest import free_port

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, **QUIET}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        *(str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")),
        *("--workers", "1"),
    ]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 120, "mlflow server did not answer in 120 s"
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _expected_metrics(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"<split>/<key>": [(step, value), ...]} from metrics.jsonl rows, written out here independently of the code:
    every number of a row (lists numbered from 0), not the split, the step, text or nulls."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            items = [(f"{key}_{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for name, v in items:
                if name in ("split", "step") or v is None or isinstance(v, str | bool):
                    continue
                out.setdefault(f"{row['split']}/{name}", []).append((row["step"], float(v)))
    return out


def _expected_params(config: dict) -> dict[str, str]:
    """The resolved config as MLflow stores it: `section.key` -> text (null and lists as JSON)."""
    return {
        f"{section}.{key}": json.dumps(value) if value is None or isinstance(value, list) else str(value)
        for section, values in config.items()
        for key, value in values.items()
    }


def _wandb_records(path: str):
    """The protobuf records of a W&B `.wandb` file (a LevelDB-style log: 7-byte file header, 32 KiB blocks of
    chunks each with a 7-byte header crc32/length/type, types FULL=1 FIRST=2 MIDDLE=3 LAST=4). wandb 0.31 has no
    Python reader of its own (`wandb.sdk.internal.datastore` is gone with wandb-core), so the test reads the format."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            chunks = payload
        else:
            chunks += payload
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(chunks)
            yield record


def _wandb_run(out: Path) -> tuple[list[str], dict, list[tuple[int, dict]]]:
    """(run ids, config, history) over every offline run directory of a run: history as (step, {key: value})."""
    ids, config, history = [], {}, []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for rec in _wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.append(rec.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history.append((rec.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
    config.pop("_wandb", None)
    return ids, config, history


def test_mlflow_and_wandb_continue_one_run_across_an_aborted_run_and_its_resume(tiny_data, tmp_path, mlflow_server):
    """2 ranks on gloo. Attempt 1 checkpoints at step 4, logs rows at 5 and 6, then aborts (two NaN losses, a crash
    with no save); attempt 2 resumes from step 4 and ends at 8. MLflow (a real server) and W&B (offline) then hold
    one run each, with the same id both times, the config once, and for every metric exactly one value per step,
    equal to metrics.jsonl's."""
    out = tmp_path / "run"
    env = train_env(**QUIET, WANDB_CONFIG_DIR=str(tmp_path / "wbcfg"), WANDB_CACHE_DIR=str(tmp_path / "wbcache"))
    env.pop("MLFLOW_TRACKING_URI", None)
    args = tiny_args(
        tiny_data,
        out,
        "--checkpoint.every_n_steps=4",
        "--schedule.max_steps=8",
        "--eval.every_n_epochs=0.45",  # validations at steps 4 and 8 (9 steps per epoch on 2 ranks)
        "--optim.max_nonfinite_steps=2",
        "--log.trackers=[mlflow,wandb]",
        f"--log.mlflow_tracking_uri={mlflow_server}",
        "--log.wandb_mode=offline",
        "--log.project=trackers-test",
    )
    rc, log = run_train(args, env={**env, "MIXMO_FAULT_NAN": "0:5,6"})
    assert rc != 0 and "consecutive non-finite losses" in log, log[-3000:]
    first = json.loads((out / "trackers.json").read_text())
    # The abort left rows past the checkpoint (step 4) in metrics.jsonl: the resume replays those steps.
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert first["mlflow"]["sent_through"] == 4 and first["wandb"]["sent_through"] == 4

    rc, log = run_train(args, env=env)
    assert rc == 0 and "resumed from step 4" in log, log[-3000:]
    state = json.loads((out / "trackers.json").read_text())
    assert all(state[name]["run_id"] == first[name]["run_id"] for name in ("mlflow", "wandb"))
    rows = read_metrics(out)
    assert [(r["split"], r["step"]) for r in rows] == [
        *[("train", s) for s in (1, 2, 3, 4)],
        ("val", 4),
        *[("train", s) for s in (5, 6, 7, 8)],
        ("val", 8),
    ]
    expected = _expected_metrics(rows)
    config = json.loads((out / "run.json").read_text())["config"]

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    run_id = state["mlflow"]["run_id"]
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "trackers-test"
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one run, reused
    assert run.data.params == _expected_params(config)
    assert set(run.data.metrics) == set(expected)
    for key, values in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == values, key  # one value per step (the aborted steps 5 and 6 are not there twice)

    ids, wb_config, history = _wandb_run(out)
    assert ids == [state["wandb"]["run_id"]] * 2  # one offline directory per attempt (rank 0's), one run id
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    assert wb_config == {k: v if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in flat.items()}
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6, 7, 8]
    by_step = dict(history)
    for key, values in expected.items():
        for step, value in values:
            got = by_step[step].pop(key)
            assert got == value or (math.isnan(got) and math.isnan(value)), (key, step)
    assert all(not left for left in by_step.values()), by_step  # nothing beyond metrics.jsonl's values


def test_a_silent_server_ends_the_run_normally_and_a_resume_sends_every_step_once(
    tiny_data, tmp_path, silent_server, mlflow_server
):
    """2 ranks on gloo, collectives timing out after 20 s, MLflow's URI a server that accepts connections and never
    answers (with MLflow's own HTTP timeouts: 120 s a try, 8 tries). The run trains to step 4 with saves at 2 and 4
    and ends normally (rank 0 never waited for the tracker), metrics.jsonl complete, with one warning naming the
    tracker, the URI and the steps not sent. Its resume against a live `mlflow server` sends the config and every
    step of metrics.jsonl, once each, to one new run."""
    silent, conns = silent_server
    out = tmp_path / "run"
    env = train_env(**QUIET)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = tiny_args(
        tiny_data,
        out,
        "--checkpoint.every_n_steps=2",
        "--schedule.max_steps=4",
        "--log.trackers=[mlflow]",
        "--log.project=silent-server-test",
        "--log.tracker_timeout_s=2",
        "--fault.startup_timeout_s=120",  # rank 0 must not hold the others at the start either
        "--fault.collective_timeout_s=20",
        "--fault.watchdog_s=60",
    )
    rc, log = run_train([*args, f"--log.mlflow_tracking_uri={silent}"], env=env, timeout=400)
    assert rc == 0, log[-3000:]
    assert conns, "MLflow never connected to the silent server"
    lines = [line for line in log.splitlines() if "log.trackers:" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"log.trackers: mlflow ({silent}) did not take the rows of steps 1 to 4 by the end of the run (no answer "
        "within log.tracker_timeout_s=2 s); a resume of this run sends them"
    ), lines
    rows = read_metrics(out)
    assert [(r["split"], r["step"]) for r in rows] == [*[("train", s) for s in (1, 2, 3, 4)], ("val", 4)]
    assert json.loads((out / "trackers.json").read_text()) == {
        "mlflow": {"run_id": None, "sent_through": -1, "uri": silent}
    }

    rc, log = run_train([*args, f"--log.mlflow_tracking_uri={mlflow_server}"], env=env, timeout=400)
    assert rc == 0 and "resumed from step 4" in log, log[-3000:]
    assert "log.trackers:" not in log, log[-3000:]
    assert read_metrics(out) == rows
    state = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert state["sent_through"] == 4 and state["uri"] == mlflow_server
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("silent-server-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [state["run_id"]]
    run = client.get_run(state["run_id"])
    assert run.data.params == _expected_params(json.loads((out / "run.json").read_text())["config"])
    expected = _expected_metrics(rows)
    assert set(run.data.metrics) == set(expected)
    for key, values in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], key))
        assert got == values, key  # every step once


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_line_naming_the_key_and_the_extra(package, tiny_data, tmp_path):
    """The package made unimportable (sys.modules[name] = None in a sitecustomize): exit 2 before anything is
    written, one `error:` line naming log.trackers, the package and the extra."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    out = tmp_path / "run"
    env = train_env(**QUIET)
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    rc, log = run_train(tiny_args(tiny_data, out, f"--log.trackers=[{package}]"), nproc=1, env=env)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, log[-3000:]
    assert f"log.trackers lists {package} but the {package} package is not installed" in errors[0]
    assert "pip install 'mixmo_dist[trackers]'" in errors[0]
    assert not out.exists()  # refused before training started: no run directory


def test_check_trackers_names_tensorboard_and_its_extra(monkeypatch):
    check_trackers(["tensorboard", "mlflow", "wandb"])  # all installed here (extras dev and trackers)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(
        ValueError,
        match=r"log\.trackers lists tensorboard \(or log\.tensorboard=true\) but the "
        r"tensorboard package is not installed; install the extra 'tensorboard'",
    ):
        check_trackers(["mlflow", "tensorboard"])


def _rows(steps) -> list[dict]:
    return [{"split": "train", "step": s, "epoch": s / 10, "loss": 1.0 / s, "member_top1": [s, -s]} for s in steps]


def test_a_resume_sends_the_kept_rows_a_tracker_lacks_and_an_older_checkpoint_gets_a_new_run(tmp_path):
    """In process, MLflow on a SQLite store. Attempt 1 sends steps 1-4 at the save at 4, then a checkpoint at 6
    completes but the process dies before its send; attempt 2 resumes from 6: it must send 5 and 6 (kept in
    metrics.jsonl) once, then 7 and 8. Attempt 3 resumes from the older step 4: the run that holds steps to 8 is left
    alone, and a new run gets steps 1-4."""
    from mixmo_dist.config.schema import LogConfig
    from mixmo_dist.runtime.accelerator import build_accelerator
    from mixmo_dist.training.trackers import TrackerFeed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=uri, project="inproc")
    config = {"run": {"name": "t", "seed": 3}, "log": {"trackers": ["mlflow"], "project": None}}
    out = tmp_path / "run"
    out.mkdir()

    def attempt(step, kept, fresh=False):
        acc = build_accelerator("no", output_dir=str(out), trackers=cfg.all_trackers)
        feed = TrackerFeed(cfg, "t", out, acc)
        feed.start(step, kept, config, fresh=fresh)
        return feed

    feed = attempt(0, [], fresh=True)
    for row in _rows(range(1, 7)):
        feed.add(row)
        if row["step"] == 4:
            feed.flush(4)
    feed.close(60)  # checkpoint 6 complete, its send never happened
    first = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert first["sent_through"] == 4

    feed = attempt(6, _rows(range(1, 7)))
    for row in _rows((7, 8)):
        feed.add(row)
    feed.flush(8)
    feed.close(60)
    second = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert second == {"run_id": first["run_id"], "sent_through": 8, "uri": uri}

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first["run_id"], "train/loss"))
    assert history == [(s, 1.0 / s) for s in range(1, 9)]
    members = sorted((m.step, m.value) for m in client.get_metric_history(first["run_id"], "train/member_top1_1"))
    assert members == [(s, -s) for s in range(1, 9)]
    assert client.get_run(first["run_id"]).data.params == {
        "run.name": "t",
        "run.seed": "3",
        "log.trackers": '["mlflow"]',
        "log.project": "null",
    }

    feed = attempt(4, _rows(range(1, 5)))
    feed.close(60)
    third = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert third["run_id"] != first["run_id"] and third["sent_through"] == 4
    new = sorted((m.step, m.value) for m in client.get_metric_history(third["run_id"], "train/loss"))
    assert new == [(s, 1.0 / s) for s in range(1, 5)]
    old = sorted(m.step for m in client.get_metric_history(first["run_id"], "train/loss"))
    assert old == list(range(1, 9))  # left as it was


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers, as a tracking server whose HTTP
    connections hang. Yields its URL and the list of accepted connections (proof that a client came and waits)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    conns: list[socket.socket] = []

    def accept():
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return  # the server was shut down

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", conns
    finally:
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accept
        srv.close()
        thread.join(10)
        for conn in conns:
            conn.close()


def _wait_for(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll until `condition()` holds (the senders work on their own threads); a bound only against a hang."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < limit_s, f"waited {limit_s:g} s for {what}"
        time.sleep(0.05)


def _tracker_lines(records) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("log.trackers:")]


@pytest.mark.timeout(240)  # a call of the training thread that waited for the silent server would hang here
def test_a_server_that_never_answers_holds_no_call_and_a_resume_sends_its_rows_once(tmp_path, silent_server, caplog):
    """In process. Attempt 1's MLflow URI is a server that accepts connections and never answers: `start` and each
    `flush` return at once, `close(0.5)` returns with one warning naming the tracker, the URI and the steps not sent,
    and trackers.json records that nothing was sent. Attempt 2 resumes at step 4 against a store that answers (a
    SQLite one): a new run gets the config and steps 1-4, once each."""
    from mixmo_dist.config.schema import LogConfig
    from mixmo_dist.runtime.accelerator import build_accelerator
    from mixmo_dist.training.trackers import TrackerFeed

    silent, conns = silent_server
    config = {"run": {"name": "t", "seed": 5}, "log": {"trackers": ["mlflow"]}}
    out = tmp_path / "run"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="mixmo_dist")

    cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=silent, project="silent")
    feed = TrackerFeed(cfg, "t", out, build_accelerator("no", output_dir=str(out), trackers=cfg.all_trackers))
    feed.start(0, [], config, fresh=True)
    for row in _rows(range(1, 5)):
        feed.add(row)
        if row["step"] % 2 == 0:
            feed.flush(row["step"])
    _wait_for(lambda: conns, "MLflow's first connection to the silent server")  # the sender is in a call
    feed.close(0.5)
    assert _tracker_lines(caplog.records) == [
        f"log.trackers: mlflow ({silent}) did not take the rows of steps 1 to 4 by the end of the run (no answer "
        "within log.tracker_timeout_s=0.5 s); a resume of this run sends them"
    ]
    state = json.loads((out / "trackers.json").read_text())
    assert state == {"mlflow": {"run_id": None, "sent_through": -1, "uri": silent}}

    caplog.clear()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=uri, project="silent")
    feed = TrackerFeed(cfg, "t", out, build_accelerator("no", output_dir=str(out), trackers=cfg.all_trackers))
    feed.start(4, _rows(range(1, 5)), config, fresh=False)
    feed.close(60)
    assert _tracker_lines(caplog.records) == []
    state = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert state["run_id"] and state["sent_through"] == 4 and state["uri"] == uri
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], "train/loss"))
    assert history == [(s, 1.0 / s) for s in range(1, 5)]
    assert client.get_run(state["run_id"]).data.params == {
        "run.name": "t",
        "run.seed": "5",
        "log.trackers": '["mlflow"]',
    }

    # A run that ends before its first save: the line says that the run was never opened (no rows were due).
    caplog.clear()
    short = tmp_path / "short"
    short.mkdir()
    cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=silent, project="silent")
    feed = TrackerFeed(cfg, "t", short, build_accelerator("no", output_dir=str(short), trackers=cfg.all_trackers))
    feed.start(0, [], config, fresh=True)
    feed.close(0.2)
    assert _tracker_lines(caplog.records) == [
        f"log.trackers: mlflow ({silent}) did not open its run by the end of the run (no answer within "
        "log.tracker_timeout_s=0.2 s)"
    ]


@pytest.mark.timeout(240)
def test_a_send_that_raises_is_one_warning_and_its_rows_are_sent_after_the_next_save(tmp_path, caplog):
    """In process, MLflow on SQLite. After the save at 2, the run is deleted (MLflow refuses to log to a deleted
    run): the send of steps 3-4 raises, which is one warning naming the tracker, the URI and the error, and nothing
    for the training thread. The run is restored; the save at 6 sends 3-6, and every step is in MLflow once."""
    from mixmo_dist.config.schema import LogConfig
    from mixmo_dist.runtime.accelerator import build_accelerator
    from mixmo_dist.training.trackers import TrackerFeed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=uri, project="raises")
    out = tmp_path / "run"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="mixmo_dist")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)

    def sent_through() -> int:
        return json.loads((out / "trackers.json").read_text())["mlflow"]["sent_through"]

    feed = TrackerFeed(cfg, "t", out, build_accelerator("no", output_dir=str(out), trackers=cfg.all_trackers))
    feed.start(0, [], {"run": {"seed": 1}}, fresh=True)
    rows = iter(_rows(range(1, 7)))
    for row in (next(rows), next(rows)):
        feed.add(row)
    feed.flush(2)
    _wait_for(lambda: sent_through() == 2, "steps 1-2 sent")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client.delete_run(run_id)
    for row in (next(rows), next(rows)):
        feed.add(row)
    feed.flush(4)
    _wait_for(lambda: _tracker_lines(caplog.records), "the failed send's warning")
    assert _tracker_lines(caplog.records) == [
        f"log.trackers: mlflow ({uri}) failed: MlflowException: The run {run_id} must be in the 'active' state. "
        "Current state is deleted.; training goes on, and the tracker is tried again after the next checkpoint (it "
        "lacks the rows of steps 3 to 4)"
    ]
    assert sent_through() == 2

    client.restore_run(run_id)
    for row in (next(rows), next(rows)):
        feed.add(row)
    feed.flush(6)
    feed.close(60)
    assert _tracker_lines(caplog.records)[1:] == [
        f"log.trackers: mlflow ({uri}) answers again; it has the rows up to step 6"
    ]
    assert sent_through() == 6
    for key, expected in (("train/loss", [1.0 / s for s in range(1, 7)]), ("train/member_top1_0", range(1, 7))):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == list(zip(range(1, 7), expected, strict=True)), key


def test_a_resume_on_another_mlflow_server_starts_a_new_run_there_with_the_whole_history(tmp_path, caplog):
    """In process. Attempt 1 sends steps 1-4 to one store; the resume at step 4 logs to another (the server moved):
    the old run id means nothing there, so a new run there gets the config and steps 1-4, with one warning, and the
    old store is left as it was."""
    from mixmo_dist.config.schema import LogConfig
    from mixmo_dist.runtime.accelerator import build_accelerator
    from mixmo_dist.training.trackers import TrackerFeed

    out = tmp_path / "run"
    out.mkdir()
    config = {"run": {"seed": 2}}
    uris = [f"sqlite:///{tmp_path / name}" for name in ("old.db", "new.db")]
    caplog.set_level(logging.INFO, logger="mixmo_dist")
    run_ids = []
    for attempt, uri in enumerate(uris):
        cfg = LogConfig(trackers=("mlflow",), mlflow_tracking_uri=uri, project="moved")
        feed = TrackerFeed(cfg, "t", out, build_accelerator("no", output_dir=str(out), trackers=cfg.all_trackers))
        feed.start(4 * attempt, _rows(range(1, 5))[: 4 * attempt], config, fresh=attempt == 0)
        if attempt == 0:
            for row in _rows(range(1, 5)):
                feed.add(row)
            feed.flush(4)
        feed.close(60)
        run_ids.append(json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"])
    assert [r.getMessage() for r in caplog.records if "mlflow run" in r.getMessage()] == [
        f"the mlflow run {run_ids[0]} is on {uris[0]}, not on {uris[1]}: starting a new mlflow run there"
    ]
    for uri, run_id in zip(uris, run_ids, strict=True):
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
        assert history == [(s, 1.0 / s) for s in range(1, 5)], uri
        assert client.get_run(run_id).data.params == {"run.seed": "2"}
        assert len(client.search_runs([client.get_experiment_by_name("moved").experiment_id])) == 1
