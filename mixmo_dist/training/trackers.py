"""Experiment trackers through Accelerate's tracker classes (TensorBoard, MLflow, W&B): one tracker run per training
run, continued on resume, fed each metrics.jsonl row once a complete checkpoint covers its step, by a background
thread per tracker, so that training never waits for one.

Why rows wait for a checkpoint: a resumed run replays the steps after its checkpoint, and metrics.jsonl drops the
rows past that step (`MetricsLog.truncate_after`), but a tracker cannot drop what it has received (MLflow keeps every
value logged at a step; W&B ignores a step below its last). A row sent only once a complete checkpoint covers its step
is never replayed, so each metric gets exactly one value per step, equal to metrics.jsonl's. The price: the trackers
lag by up to one checkpoint interval (`checkpoint.every_n_steps`, `checkpoint.every_n_minutes`).

Why a thread per tracker: a tracker's calls are network requests made on rank 0 (MLflow's REST API; W&B's service).
Made inline, a tracking server that stops answering (a hung HTTP connection: MLflow waits 120 s per try and tries
8 times, about 20 minutes per request) holds rank 0 after a save, or at the start, while the other ranks wait in
their next collective, and after `fault.collective_timeout_s` the job is torn down as a hang. Here rank 0 only hands
the rows a save covers to each tracker's sender; the sender's daemon thread opens the run, logs the config, sends
the rows and closes the run, every call on that one thread (MLflow's active run is thread-local). Accelerate's
`init_trackers`/`end_training` would make those calls on the training thread: the trackers are built from
Accelerate's tracker classes here instead, and `accelerator.trackers` stays empty. A failed open or send is one
warning; the tracker tries again after the next save. At the end of the run `TrackerFeed.close` waits at most
`log.tracker_timeout_s`, then names, per tracker not done, the steps it lacks.

`<output_dir>/trackers.json` holds, per tracker, its run id (MLflow, W&B), `sent_through`, the last step whose rows it
has confirmed taking, and for MLflow the tracking URI the run lives on. Only a sender changes `sent_through`, after
the tracker's call returned, so a resume reopens the same runs and first sends them the kept rows of metrics.jsonl
they lack: those of a save whose send a kill cut short, or that a server down did not take. Rank 0 only.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from mixmo_dist.config.schema import LogConfig
from mixmo_dist.runtime.files import write_json_atomic
from mixmo_dist.training.reporting import flatten_record

log = logging.getLogger("mixmo_dist")

TRACKERS_FILE = "trackers.json"


class TrackerError(ValueError):
    """trackers.json cannot be read at the start of a run; one line. (A tracker that cannot open its run is a
    warning: its sender tries again after the next save.)"""


def flatten_config(config: dict) -> dict:
    """`{section: {key: value}}` -> `{"section.key": value}`, the hyperparameters every tracker takes.

    Values other than bool, int, float and str (null, lists) become their JSON text: TensorBoard's hparams refuse
    them, MLflow stores text anyway.
    """
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            ok = isinstance(value, bool | int | float | str)
            flat[f"{section}.{key}"] = value if ok else json.dumps(value)
    return flat


def metric_values(rec: dict) -> dict:
    """The numbers of one metrics row, named `<split>/<key>`, lists numbered as in metrics.csv (`val/member_top1_0`).

    The split and the step (the tracker's step) are left out, and so are text (`val_split`) and nulls (`grad_norm`
    on a skipped step, `diversity` without a shared failure).
    """
    split = rec["split"]
    return {
        f"{split}/{key}": value
        for key, value in flatten_record(rec).items()
        if key not in ("split", "step") and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _one_line(err: BaseException) -> str:
    """An exception as one short line (MLflow's messages hold the whole failed URL and urllib3's retry story)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _steps(rows) -> str:
    steps = [r["step"] for r in rows]
    return f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]} to {steps[-1]}"


class TrackerFeed:
    """The trackers of `log.trackers` (and `log.tensorboard`) for one run directory, on rank 0.

    The training thread calls `start`, `add` (each metrics row), `flush` (each complete checkpoint) and `close`; none
    of them waits for a tracker except `close`, for at most `log.tracker_timeout_s`.

    Args:
        cfg: the `log` section.
        run_name: `run.name`: the tracker runs' name, and the project where `log.project` is null.
        output_dir: the run directory (trackers.json, W&B's wandb/, the default MLflow store).
        accelerator: the run's Accelerator (its process state and logging directory; built with
            `log_with=cfg.all_trackers`, which checks the packages).
    """

    def __init__(self, cfg: LogConfig, run_name: str, output_dir: Path, accelerator) -> None:
        self.names = cfg.all_trackers
        self.cfg = cfg
        self.run_name = run_name
        self.out = output_dir
        self.acc = accelerator
        self.lock = threading.Lock()  # the senders' entries, rows and trackers.json, shared with their threads
        self.senders: dict[str, _Sender] = {}
        self.pending: list[dict] = []  # rows appended to metrics.jsonl that no complete checkpoint covers yet
        self.started = False
        self.closed = False  # after `close`: a sender still running writes nothing more

    @property
    def path(self) -> Path:
        return self.out / TRACKERS_FILE

    def start(self, step: int, rows: list[dict], config: dict, *, fresh: bool) -> None:
        """Choose each tracker's run, new or the one trackers.json names, and start its sender, which opens the run
        and sends it the kept rows it lacks; returns without waiting for any tracker.

        Called on rank 0 once metrics.jsonl is cut back to `step` (the checkpoint's; 0 for a fresh start), with the
        rows it kept: all of them are final. A new run gets `config` (the resolved config) as its hyperparameters, once.

        Raises:
            TrackerError: trackers.json cannot be read.
        """
        if not self.names:
            return
        known = {} if fresh else self._read()
        if fresh and self.path.exists():
            log.warning("starting from step 0: new tracker runs (the ones %s named are left as they are)", self.path)
        flat = flatten_config(config)
        for name in self.names:
            entry = known.get(name)
            where = self._where(name)
            if entry is not None and entry["sent_through"] > step:
                # Its steps past `step` would be sent a second time: a fresh run gets the whole history instead.
                log.warning(
                    "the %s run %s holds steps up to %d, past the resumed step %d: starting a new %s run",
                    *(name, entry.get("run_id"), entry["sent_through"], step, name),
                )
                entry = None
            elif entry is not None and name == "mlflow" and entry["run_id"] and entry.get("uri", where) != where:
                # The run id means nothing on another server: a new run there gets the whole history.
                log.warning(
                    "the mlflow run %s is on %s, not on %s: starting a new mlflow run there",
                    *(entry["run_id"], entry["uri"], where),
                )
                entry = None
            if entry is None:
                entry = {"run_id": secrets.token_hex(6) if name == "wandb" else None, "sent_through": -1}
            if name == "mlflow":
                entry["uri"] = where
            # sent_through -1: the run was never confirmed open with its config (a server that did not answer):
            # it is opened as new (MLflow: a new run; W&B: its id, created or reopened) and gets the config.
            new = entry["sent_through"] < 0
            kept = [r for r in rows if r["step"] > entry["sent_through"]]
            self.senders[name] = _Sender(
                self,
                name,
                entry,
                kwargs=self._init_kwargs(name, entry),  # now: the sender sets MLFLOW_TRACKING_URI, which it reads
                config=flat if new else None,
                rows=kept,
                through=step,
            )
        with self.lock:
            self._write()
        self.started = True
        for sender in self.senders.values():
            sender.thread.start()

    def add(self, rec: dict) -> None:
        """Keep a row just appended to metrics.jsonl until a complete checkpoint covers its step."""
        if self.started:
            self.pending.append(rec)

    def flush(self, step: int) -> None:
        """Hand each tracker's sender the rows up to `step` (a complete checkpoint's: final); does not wait for them
        to be sent."""
        if not self.started:
            return
        covered = [r for r in self.pending if r["step"] <= step]
        self.pending = [r for r in self.pending if r["step"] > step]
        for sender in self.senders.values():
            sender.hand(covered, step)

    def close(self, timeout_s: float | None) -> None:
        """End of the run: give the senders up to `timeout_s` seconds to send what they hold and close their runs,
        then one warning per tracker not done, naming it, its URI and the steps it lacks (a resume sends them).
        `timeout_s=None` leaves at once, silently (a second Ctrl-C, a lost peer). Either way no sender writes
        trackers.json afterwards, and a sender still blocked dies with the process (daemon threads)."""
        if not self.started or self.closed:
            return
        if timeout_s is not None:
            deadline = time.monotonic() + timeout_s
            for sender in self.senders.values():
                sender.close()
            for sender in self.senders.values():
                sender.thread.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.closed = True
            lines = [s.report(timeout_s) for s in self.senders.values() if not s.done]
            for sender in self.senders.values():
                sender.wake.notify()  # a sender waiting for rows ends; one blocked in a call ends after it
        if timeout_s is not None:
            for line in lines:
                log.warning("%s", line)

    def _write(self) -> None:
        """trackers.json from every sender's entry; the caller holds `self.lock`."""
        if not self.closed:
            write_json_atomic(self.path, {name: sender.entry for name, sender in self.senders.items()})

    def _read(self) -> dict:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise TrackerError(f"cannot read {self.path}: {err}; move it aside to start new tracker runs") from None
        return state if isinstance(state, dict) else {}

    def _make(self, name: str, kwargs: dict):
        """Accelerate's tracker for `name`, built as `Accelerator.init_trackers` builds it (not started)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        project = self.cfg.project or self.run_name
        if cls.requires_logging_directory:
            return cls(project, self.acc.logging_dir, **kwargs)
        return cls(project, **kwargs)

    def _init_kwargs(self, name: str, entry: dict) -> dict:
        """What the tracker's class gets: the run to continue, or the new run's name."""
        if name == "mlflow":
            kwargs = {"run_id": entry["run_id"]} if entry["run_id"] else {"run_name": self.run_name}
            if self.cfg.mlflow_tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ:
                kwargs["logging_dir"] = str(self.out.resolve() / "mlartifacts")  # a new experiment's artifacts
            return kwargs
        if name == "wandb":
            kwargs = {"id": entry["run_id"], "resume": "allow", "name": self.run_name, "dir": str(self.out)}
            if self.cfg.wandb_mode is not None:
                kwargs["mode"] = self.cfg.wandb_mode
            return kwargs
        return {}

    def _where(self, name: str) -> str:
        """Where a tracker's data goes, for trackers.json (MLflow) and the warnings."""
        if name == "mlflow":
            return self._mlflow_uri()
        if name == "wandb":
            if (self.cfg.wandb_mode or os.environ.get("WANDB_MODE", "online")) == "offline":
                return f"offline in {self.out / 'wandb'}"
            return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return str(Path(self.acc.logging_dir or self.out) / (self.cfg.project or self.run_name))

    def _mlflow_uri(self) -> str:
        return (
            self.cfg.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.out.resolve() / 'mlflow.db'}"
        )


class _Sender:
    """One tracker on its own daemon thread: opens the run, sends the rows `hand` gives it, closes the run on `close`.

    Every call into the tracker happens on this thread. A call that raises is one warning (the first of a series;
    the line when it works again is an info); the rows it did not confirm are kept and tried again, with the open
    if that failed, once a newer save hands rows over, and once more at `close`. The feed's lock guards what the
    training thread shares with it: `rows`, `through`, `closing` and the entry.
    """

    def __init__(
        self, feed: TrackerFeed, name: str, entry: dict, *, kwargs: dict, config: dict | None, rows, through: int
    ):
        self.feed, self.name, self.entry = feed, name, entry  # entry: {"run_id", "sent_through"[, "uri"]}
        self.kwargs = kwargs  # for the tracker's class (`TrackerFeed._init_kwargs`)
        self.where = feed._where(name)
        self.config = config  # the hyperparameters a new run gets once open; None for a continued run
        self.rows = collections.deque(rows)  # rows covered by a complete checkpoint, not yet confirmed sent
        self.through = through  # the newest complete checkpoint's step handed over
        self.wake = threading.Condition(feed.lock)
        self.closing = False
        self.tracker = None  # open (started) once set
        self.failed_at: int | None = None  # `through` at the last failure: tried again after a newer save
        self.error: str | None = None  # the last failure, until a call works again
        self.done = False  # every row sent and the run closed
        self.thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)

    def hand(self, rows: list[dict], through: int) -> None:
        with self.wake:
            self.rows.extend(r for r in rows if r["step"] > self.entry["sent_through"])
            self.through = max(self.through, through)
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()

    def report(self, timeout_s: float | None) -> str:
        """The end-of-run warning of a sender not done; the caller holds the feed's lock."""
        rows = [r for r in self.rows if r["step"] > self.entry["sent_through"]]
        if rows:
            what = f"did not take the rows of {_steps(rows)}"
        else:
            what = "did not open its run" if self.tracker is None else "took every row but did not close its run"
        if self.thread.is_alive():
            why = f"no answer within log.tracker_timeout_s={timeout_s:g} s"
        else:
            why = f"failed: {self.error}"
        then = "; a resume of this run sends them" if rows else ""
        return f"log.trackers: {self.name} ({self.where}) {what} by the end of the run ({why}){then}"

    def _ready(self) -> bool:
        if self.closing or self.feed.closed:
            return True
        if self.failed_at is not None:
            return self.through > self.failed_at
        return self.tracker is None or self.through > self.entry["sent_through"]

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(self._ready)
                if self.feed.closed:
                    return  # given up by `close`: nothing more is sent, recorded or said
                rows, through, closing = list(self.rows), self.through, self.closing
            try:
                self._open()
                self._send(rows, through)
                if closing:
                    self.tracker.finish()
            except Exception as err:
                self._failed(err, through, closing)
                if closing:
                    return
                continue
            with self.wake:
                if self.error is not None:
                    log.info(
                        "log.trackers: %s (%s) answers again; it has the rows up to step %d",
                        *(self.name, self.where, self.entry["sent_through"]),
                    )
                self.error, self.failed_at = None, None
                if closing:
                    self.done = True
                    return

    def _open(self) -> None:
        """Start the tracker's run and log a new run's config; record the run id, with `sent_through` 0, once both
        are done (a kill in between leaves an empty MLflow run behind; the next attempt opens a new one)."""
        if self.tracker is None:
            if self.name == "mlflow":
                import mlflow

                mlflow.set_tracking_uri(self.entry["uri"])
            tracker = self.feed._make(self.name, self.kwargs)
            tracker.start()
            self.tracker = tracker
        if self.config is not None:
            self.tracker.store_init_configuration(self.config)
            self.config = None
            with self.wake:
                if self.name == "mlflow":
                    self.entry["run_id"] = self.tracker.tracker.info.run_id
                self.entry["sent_through"] = max(self.entry["sent_through"], 0)  # open, with its config
                self.feed._write()

    def _send(self, rows: list[dict], through: int) -> None:
        """Send the rows after `sent_through` up to `through`, confirming each step once all its rows are taken."""
        done = current = self.entry["sent_through"]  # only this thread changes `sent_through`
        for rec in rows:
            step = rec["step"]
            if done < step <= through:
                if step != current:
                    self._confirm(current)
                    current = step
                self.tracker.log(metric_values(rec), step=step)
        self._confirm(through)

    def _confirm(self, step: int) -> None:
        """The tracker has taken every row up to `step`: drop them, record it in trackers.json."""
        with self.wake:
            if step <= self.entry["sent_through"]:
                return
            self.entry["sent_through"] = step
            while self.rows and self.rows[0]["step"] <= step:
                self.rows.popleft()
            self.feed._write()

    def _failed(self, err: Exception, through: int, closing: bool) -> None:
        with self.wake:
            first = self.error is None
            self.error, self.failed_at = _one_line(err), through
            lacks = [r for r in self.rows if r["step"] > self.entry["sent_through"]]
            if closing or self.feed.closed:
                return  # `TrackerFeed.close` reports it, in its one line
        say = log.warning if first else log.debug
        lacking = f" (it lacks the rows of {_steps(lacks)})" if lacks else ""
        say(
            "log.trackers: %s (%s) failed: %s; training goes on, and the tracker is tried again after the next "
            "checkpoint%s",
            *(self.name, self.where, self.error, lacking),
        )
