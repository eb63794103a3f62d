"""Experiment trackers through Accelerate (TensorBoard, MLflow, W&B): one tracker run per training run, continued
on resume, fed each metrics.jsonl row once a complete checkpoint covers its step.

Why rows wait for a checkpoint: a resumed run replays the steps after its checkpoint, and metrics.jsonl drops the
rows past that step (`MetricsLog.truncate_after`), but a tracker cannot drop what it has received (MLflow keeps every
value logged at a step; W&B ignores a step below its last). A row sent only once a complete checkpoint covers its step
is never replayed, so each metric gets exactly one value per step, equal to metrics.jsonl's. The price: the trackers
lag by up to one checkpoint interval (`checkpoint.every_n_steps`, `checkpoint.every_n_minutes`).

`<output_dir>/trackers.json` holds, per tracker, its run id (MLflow, W&B) and `sent_through`, the last step whose
rows it has received: a resume reopens the same runs and first sends them the rows of metrics.jsonl they lack (a
kill between a save and its send). Rank 0 only: Accelerate runs `init_trackers` and every tracker's `log` on the
main process alone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from mixmo_dist.config.schema import LogConfig
from mixmo_dist.runtime.files import write_json_atomic
from mixmo_dist.training.reporting import flatten_record

log = logging.getLogger("mixmo_dist")

TRACKERS_FILE = "trackers.json"


class TrackerError(ValueError):
    """A tracker could not open its run (a wrong MLflow URI, a server that does not answer); one line."""


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


class TrackerFeed:
    """The trackers of `log.trackers` (and `log.tensorboard`) for one run directory, on rank 0.

    Args:
        cfg: the `log` section.
        run_name: `run.name`: the tracker runs' name, and the project where `log.project` is null.
        output_dir: the run directory (trackers.json, W&B's wandb/, the default MLflow store).
        accelerator: built with `log_with=cfg.all_trackers`.
    """

    def __init__(self, cfg: LogConfig, run_name: str, output_dir: Path, accelerator) -> None:
        self.names = cfg.all_trackers
        self.cfg = cfg
        self.run_name = run_name
        self.out = output_dir
        self.acc = accelerator
        self.state: dict[str, dict] = {}  # name -> {"run_id", "sent_through"}: trackers.json
        self.pending: list[dict] = []  # rows appended to metrics.jsonl that not every tracker has received
        self.started = False

    @property
    def path(self) -> Path:
        return self.out / TRACKERS_FILE

    def start(self, step: int, rows: list[dict], config: dict, *, fresh: bool) -> None:
        """Open each tracker's run, new or the one trackers.json names, and send it the kept rows it lacks.

        Called on rank 0 once metrics.jsonl is cut back to `step` (the checkpoint's; 0 for a fresh start), with the
        rows it kept: all of them are final. A new run gets `config` (the resolved config) as its hyperparameters, once.

        Raises:
            TrackerError: a tracker could not open its run.
        """
        if not self.names:
            return
        known = {} if fresh else self._read()
        if fresh and self.path.exists():
            log.warning("starting from step 0: new tracker runs (the ones %s named are left as they are)", self.path)
        init_kwargs, new = {}, []
        for name in self.names:
            entry = known.get(name)
            if entry is not None and entry["sent_through"] > step:
                # Its steps past `step` would be sent a second time: a fresh run gets the whole history instead.
                log.warning(
                    "the %s run %s holds steps up to %d, past the resumed step %d: starting a new %s run",
                    *(name, entry.get("run_id"), entry["sent_through"], step, name),
                )
                entry = None
            if entry is None:
                entry = {"run_id": secrets.token_hex(6) if name == "wandb" else None, "sent_through": -1}
                new.append(name)
            self.state[name] = entry
            init_kwargs[name] = self._init_kwargs(name, entry)
        try:
            if "mlflow" in self.names:
                import mlflow

                mlflow.set_tracking_uri(self._mlflow_uri())
            self.acc.init_trackers(self.cfg.project or self.run_name, init_kwargs=init_kwargs)
            flat = flatten_config(config)
            for name in new:
                tracker = self.acc.get_tracker(name)
                tracker.store_init_configuration(flat)
                if name == "mlflow":
                    self.state[name]["run_id"] = tracker.tracker.info.run_id
        except Exception as err:
            raise TrackerError(f"log.trackers: could not open the tracker runs ({type(err).__name__}: {err})") from err
        self.started = True
        self.pending = [r for r in rows if r["step"] > self._sent_through()]
        self.flush(step)

    def add(self, rec: dict) -> None:
        """Keep a row just appended to metrics.jsonl until a complete checkpoint covers its step."""
        if self.started:
            self.pending.append(rec)

    def flush(self, step: int) -> None:
        """Send each tracker the rows up to `step` (a complete checkpoint's) it has not received; record it in
        trackers.json. A tracker that fails keeps the rows from the failing step on for the next save, with a warning
        (the rows of that step it took before failing are sent again then)."""
        if not self.started:
            return
        for name, entry in self.state.items():
            tracker = self.acc.get_tracker(name)
            done = entry["sent_through"]
            through = current = done  # `through`: the last step all of whose rows this tracker has taken
            try:
                for rec in self.pending:
                    if done < rec["step"] <= step:
                        if rec["step"] != current:
                            through, current = current, rec["step"]
                        tracker.log(metric_values(rec), step=rec["step"])
                through = step
            except Exception as err:
                log.warning(
                    "log.trackers: %s took the rows up to step %d, not those up to step %d (kept for the next "
                    "save): %s",
                    *(name, through, step, err),
                )
            entry["sent_through"] = max(done, through)
        self.pending = [r for r in self.pending if r["step"] > self._sent_through()]
        write_json_atomic(self.path, self.state)

    def _sent_through(self) -> int:
        return min((e["sent_through"] for e in self.state.values()), default=-1)

    def _read(self) -> dict:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise TrackerError(f"cannot read {self.path}: {err}; move it aside to start new tracker runs") from None
        return state if isinstance(state, dict) else {}

    def _init_kwargs(self, name: str, entry: dict) -> dict:
        """What Accelerate passes to the tracker's class: the run to continue, or the new run's name."""
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

    def _mlflow_uri(self) -> str:
        return (
            self.cfg.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.out.resolve() / 'mlflow.db'}"
        )
