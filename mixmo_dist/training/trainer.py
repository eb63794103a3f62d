"""The training flow: the only module that knows the order of the stages.

loader batch -> member inputs (repetition + shuffles) -> sampled mixing -> model (encoders, mixing, core, heads)
-> reweighted loss -> agreed step (non-finite skip, stop/save flags) -> optimizer -> metrics / checkpoint.

Shape legend: M members, U unique images per rank per micro-batch, R = U * repetitions rows, K classes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from mixmo_dist import __version__
from mixmo_dist.checkpoint.lock import lock_run_dir
from mixmo_dist.checkpoint.state import CheckpointManager
from mixmo_dist.checkpoint.store import CheckpointStore
from mixmo_dist.config import Config, ConfigError, config_to_dict, dump_config
from mixmo_dist.evaluation.metrics import EvalAccumulator
from mixmo_dist.model import build_model
from mixmo_dist.model.sync_bn import use_sync_batchnorm
from mixmo_dist.model.weights import init_from_vanilla
from mixmo_dist.ops import cut_probability, sample_mixing
from mixmo_dist.ops.input_cutmix import input_cutmix
from mixmo_dist.runtime.collectives import Collectives, StopAllRanks
from mixmo_dist.runtime.faults import Watchdog, record_and_requeue, set_collective_timeout
from mixmo_dist.runtime.files import naming_the_file, write_json_atomic
from mixmo_dist.runtime.seeds import RankRNG, seed_rank
from mixmo_dist.runtime.signals import INTERRUPT, StopSignal
from mixmo_dist.runtime.startup import STARTUP
from mixmo_dist.training.data_errors import DataGuard, build_data_on_every_rank
from mixmo_dist.training.ddp import settle_buckets
from mixmo_dist.training.loss import mixmo_loss, reweight
from mixmo_dist.training.members import member_inputs
from mixmo_dist.training.optim import EMA, build_optimizer, build_schedule, set_lr
from mixmo_dist.training.plan import build_plan, data_placement, warn_if_batch_exceeds_data
from mixmo_dist.training.reporting import BestValidation, MetricsLog, Progress, metric_columns, run_info
from mixmo_dist.training.trackers import TrackerError, TrackerFeed

log = logging.getLogger("mixmo_dist")


# Mutation testing (issue 22) covers the step, not start-up, SLURM or fault handling: those are checked by the
# subprocess runs of test_faults.py, test_slurm*.py and test_checkpoint*.py, which mutmut cannot select. The two
# fault hooks below are the tests' own (NaN losses and stalls on chosen ranks at chosen steps).
# pragma: no mutate start
def _fault_nan_steps(rank: int) -> set[int]:
    """Test hook: MIXMO_FAULT_NAN="RANK:STEP[,STEP...]" makes that rank's loss NaN at those steps."""
    spec = os.environ.get("MIXMO_FAULT_NAN", "")
    if not spec:
        return set()
    who, _, steps = spec.partition(":")
    return {int(s) for s in steps.split(",") if s} if int(who) == rank else set()


def _fault_stall(rank: int) -> tuple[int, float] | None:
    """Test hook: MIXMO_FAULT_STALL="RANK:STEP:SECONDS" (RANK * = every rank) makes that rank's data wait SECONDS
    before step STEP, once per process, as a stalled file system read would."""
    spec = os.environ.get("MIXMO_FAULT_STALL", "")
    if not spec:
        return None
    who, step, seconds = spec.split(":")
    return (int(step), float(seconds)) if who in ("*", str(rank)) else None


# pragma: no mutate end


@dataclass
class StepResult:
    """What one optimizer step reports back to the loop (tensors stay on the device until logged)."""

    loss: torch.Tensor
    member_losses: torch.Tensor
    kappa_mean: torch.Tensor
    cut: torch.Tensor
    cut_prob: float
    lr: float
    grad_norm: float | None
    skipped: bool
    stop: float  # NO_STOP, PREEMPT or INTERRUPT (runtime/signals.py), agreed by all ranks
    save_due: bool


class Trainer:
    """Builds every stage from the config, then `fit()` runs the loop. What must survive a requeue is registered
    with the `CheckpointManager` in one place (`_build_checkpoints`); the trainer's own share is its counters."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.comm = Collectives(accelerator)
        self.out = Path(cfg.run.output_dir)
        self.generator = torch.Generator(device=self.device)
        seed_rank(cfg.run.seed, self.rank, self.generator)
        self.place = data_placement(cfg, self.rank, self.world, self.device)
        # The data first: a run whose data is missing must leave nothing behind (no output directory, no lock).
        self.data = build_data_on_every_rank(cfg.data, self.place, self.comm)
        STARTUP.mark("dataset index")
        # A failed loader's placeholder batches: test_data_errors.py (2 ranks, subprocesses).
        self.guard = DataGuard(self.comm, self.device, self._placeholder_batch)  # pragma: no mutate
        self.lock = lock_run_dir(self.out, self.comm, main=accelerator.is_main_process)
        self.faults = self.comm.faults
        self.faults.stacks_dir = self.out / "stacks"
        if self.device.type == "cuda":  # pragma: no mutate (CUDA only; the GPU tests check the stacks)
            # NCCL's watchdog ends a rank whose collective timed out with SIGABRT, before any Python handler runs:
            # its flight recorder dumps into stacks/, and faulthandler adds the rank's Python stacks beside it.
            self.faults.enable_crash_stacks()
        self.plan = build_plan(cfg, self.world, len(self.data.train))
        warn_if_batch_exceeds_data(cfg, self.plan, self.data.num_train)  # pragma: no mutate (test_plan.py)
        self.best = BestValidation(self.data.val_split)
        self.num_classes = self._num_classes()
        with self.faults.during("start-up (DDP broadcasts rank 0's weights)"):
            self.model, self.optimizer = accelerator.prepare(*self._build_model_and_optimizer())
        self.raw = accelerator.unwrap_model(self.model)
        STARTUP.mark("model build")
        if cfg.model.compile:  # pragma: no mutate block (Inductor: test_precision.py, a subprocess)
            self.raw.forward_train = torch.compile(self.raw.forward_train)
        self.schedule = build_schedule(cfg.schedule, self.plan.lr, self.plan.steps_per_epoch, self.plan.total_steps)
        self.ema = EMA(self.raw, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.metrics = MetricsLog(self.out, metric_columns(cfg.mixmo.num_members))
        self.trackers = TrackerFeed(cfg.log, cfg.run.name, self.out, accelerator)  # opened by `resume`, on rank 0
        self.stop_signal = StopSignal()
        self.step = self.nonfinite_total = self.nonfinite_run = 0
        self.last_eval = -1  # the step of the last validation row; restored, so a finished run is not evaluated twice
        self.fault_nan = _fault_nan_steps(self.rank)
        self.fault_stall = _fault_stall(self.rank)  # pragma: no mutate (a test hook)
        self.write_error: str | None = None  # rank 0's failed metrics write, until every rank agrees to stop
        fault = cfg.fault
        # Until the first step, the watchdog allows what start-up may take (resume, compile, a cold first batch).
        startup_limit = max(fault.watchdog_s, fault.startup_timeout_s) if fault.watchdog_s else 0.0
        # What a hang does (a requeue, a fault record): test_faults.py's stalled ranks, in subprocesses.
        # pragma: no mutate start
        self.watchdog = Watchdog(self.faults, startup_limit, on_fire=partial(self._requeue_after_fault, "hang"))
        # pragma: no mutate end
        self.checkpoints = self._build_checkpoints()

    # Building the stages (start-up; checked by every training run, in process and in subprocesses).
    # pragma: no mutate start
    # -- building ---------------------------------------------------------------------------------------------
    def _placeholder_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros shaped like a train batch (images [U*V,3,S,S], labels [U]): what a rank whose loader failed trains
        on."""
        size, u, v = self.cfg.data.image_size, self.place.unique_per_rank, self.place.views_per_image
        fmt = torch.channels_last if self.place.channels_last else torch.contiguous_format
        images = torch.zeros(u * v, 3, size, size, device=self.device).contiguous(memory_format=fmt)
        return images, torch.zeros(u, dtype=torch.int64, device=self.device)

    def _num_classes(self) -> int:
        found = len(self.data.classes)
        wanted = self.cfg.model.num_classes
        if wanted is not None and wanted != found:
            raise ConfigError(f"config key model.num_classes: {wanted}, but {self.cfg.data.root} has {found} classes")
        return found

    def _build_model_and_optimizer(self):
        m = self.cfg.model
        model = build_model(
            m.arch, self.cfg.mixmo.num_members, self.num_classes, init=m.init, head_init_std=m.head_init_std
        )
        if m.init_from:
            init_from_vanilla(model, m.init_from)
        if m.sync_bn:
            model = use_sync_batchnorm(model, self.device)
        if m.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(self.device)
        return model, build_optimizer(model, self.cfg.optim, self.plan.lr)

    def _build_checkpoints(self) -> CheckpointManager:
        rng = RankRNG(self.generator, seed=self.cfg.run.seed, rank=self.rank)
        return CheckpointManager(
            CheckpointStore(self.out / "checkpoints", self.cfg.checkpoint.keep_last),
            self.comm,
            rank=self.rank,
            model=self.raw,
            optimizer=self.optimizer,
            ema=self.ema,
            scaler=self.acc.scaler,
            counters=self,
            rank_states={"rng": rng, "data": self.data.train},
            shape={
                "arch": self.cfg.model.arch,
                "num_members": self.cfg.mixmo.num_members,
                "num_classes": self.num_classes,
                "rows_per_rank": self.plan.rows_per_rank,
                "world_size": self.world,
                "classes": list(self.data.classes),
            },
            describe=lambda: {
                "epoch": self.epoch,
                "version": __version__,
                "config": config_to_dict(self.cfg),
                "schedule": {"step": self.step, "lr": self.schedule(self.step)},
                "plan": asdict(self.plan),
            },
            elastic=self.cfg.data.global_batch_size is not None,
        )

    # pragma: no mutate end
    # -- the trainer's own state (registered as the checkpoint's counters) ------------------------------------
    def state_dict(self) -> dict:
        counters = {
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "last_eval": self.last_eval,
        }
        return {**counters, **self.best.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.last_eval = state.get("last_eval", -1)  # absent from checkpoints of older versions
        self.best.load_state_dict(state)

    @property
    def epoch(self) -> float:
        return self.step * self.plan.grad_accum_steps / self.plan.micro_batches_per_epoch

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until the stop step or a signal. Returns "completed", "preempted" (SIGUSR2/SIGTERM: requeue) or
        "interrupted" (Ctrl-C: the checkpoint is saved, nothing is requeued)."""
        self.watchdog.start()
        with self.faults.during("resume"):
            self.resume()
        self._write_run_json()
        STARTUP.mark("resume")
        self.stop_signal.install()
        progress = Progress(self.plan.stop_step, self.step, self.cfg.log.progress, self.cfg.log.every_n_steps)
        batches = self._micro_batches()
        last_save = time.monotonic()
        # Throughput figures are wall-clock measurements: no test can assert them (pragmas below, issue 22).
        window_t0, window_rows = time.monotonic(), 0  # pragma: no mutate
        saved_at = self.step if self.step > 0 else -1
        self.faults.checkpoint_step = saved_at
        unsettled = self.step > 0 and self.world > 2  # pragma: no mutate (3+ ranks: test_world_size.py)
        first_step = True
        try:
            while self.step < self.plan.stop_step:
                t0 = time.monotonic()
                self.faults.step, self.faults.op = self.step, "training step"
                if self.fault_stall is not None and self.step == self.fault_stall[0]:  # pragma: no mutate block
                    time.sleep(self.fault_stall[1])
                    self.fault_stall = None
                micro = self.guard.take(batches, self.plan.grad_accum_steps)
                STARTUP.mark("first batch")
                t1 = time.monotonic()
                # Resumed on 3+ ranks: DDP buckets as after an uninterrupted run's step 0 (test_world_size.py).
                if unsettled:  # pragma: no mutate block
                    settle_buckets(self.raw, self.optimizer, self.generator, partial(self._settle, micro[0]))
                    unsettled = False
                due = self.cfg.checkpoint.every_n_minutes is not None and (
                    time.monotonic() - last_save >= 60 * self.cfg.checkpoint.every_n_minutes
                )
                res = self.train_step(micro, save_due=due)
                STARTUP.finish("first step")
                t2 = time.monotonic()
                self.watchdog.beat()
                if first_step:
                    self._after_first_step()
                    first_step = False
                window_rows += self.plan.rows_per_rank * self.world * self.plan.grad_accum_steps  # pragma: no mutate
                # Every log.every_n_steps, at a stop and at the last step (a run's final row is always there).
                if self.step % self.cfg.log.every_n_steps == 0 or res.stop or self.step == self.plan.stop_step:
                    rate = window_rows / max(t2 - window_t0, 1e-9)  # pragma: no mutate
                    rec = self._train_record(res, rate, t1 - t0, t2 - t1)  # pragma: no mutate
                    window_t0, window_rows = time.monotonic(), 0  # pragma: no mutate
                    if self.acc.is_main_process:
                        self._append_metrics(rec)
                        progress.update(self.step, rec)
                # The end-of-run validation comes before the last step's save, so the checkpoint records it
                # (`last_eval`) and running the finished run again adds no second row.
                last = self.step == self.plan.stop_step and self.cfg.eval.at_end
                if self.step % self.plan.eval_every_steps == 0 or last:
                    self._log_val(self.evaluate())
                every = self.cfg.checkpoint.every_n_steps
                if res.stop or res.save_due or (every and self.step % every == 0):
                    self._save()
                    saved_at, last_save = self.step, time.monotonic()
                if res.stop:
                    return self._stopped(res.stop)
            if self.cfg.eval.at_end and self.last_eval != self.step:
                self._log_val(self.evaluate())
            if saved_at != self.step:
                self._save()
            self.comm.agree(self.write_error)  # a metrics row lost after the last step's agreement
            return "completed"
        finally:
            self.watchdog.stop()
            progress.close()
            self.stop_signal.uninstall()

    # pragma: no mutate start
    def _after_first_step(self) -> None:
        """Start-up is over: from now on a peer silent for `fault.collective_timeout_s` is lost (torchtitan's
        pattern: a generous timeout for the start, a short one once the first step has shown the group works)."""
        fault = self.cfg.fault
        self.watchdog.set_limit(fault.watchdog_s)
        if self.world > 1:
            if set_collective_timeout(fault.collective_timeout_s):
                log.info(
                    "collective timeout now %g s (fault.collective_timeout_s; %g s until the first step)",
                    fault.collective_timeout_s,
                    fault.startup_timeout_s,
                )
            else:
                log.warning(
                    "this torch cannot change a process group's timeout: collectives keep the start-up timeout of "
                    "%g s (fault.startup_timeout_s)",
                    fault.startup_timeout_s,
                )

    # pragma: no mutate end
    def _append_metrics(self, rec: dict) -> None:
        """Rank 0 appends a metrics row; a failed write (a full disk) is kept and stops every rank at the next
        step's agreement, instead of a traceback on rank 0 while the others wait for it."""
        if self.write_error is not None:
            return
        try:
            self.metrics.append(rec)
            self.trackers.add(rec)  # sent once a complete checkpoint covers its step (training/trackers.py)
        except OSError as err:
            self.write_error = (
                f"cannot append to {err.filename}: {err.strerror or err} at step {self.step}; the rows before it are "
                f"whole and the last complete checkpoint ({self.checkpoints.latest or 'none yet'}) is intact: free "
                "space and run the same command again to resume"
            )

    def _save(self) -> None:
        with self.faults.during("checkpoint save"):
            # A checkpoint must not be committed after a lost metrics row: it would record that step as done.
            self.comm.agree(self.write_error)
            self.checkpoints.save(on_file=self.watchdog.beat)
        self.faults.checkpoint_step = self.step
        if self.acc.is_main_process:
            # No resume replays a step up to here: its rows are final. Handed to the trackers' threads, not waited
            # for: a tracking server that stops answering must not hold rank 0 while the others wait for it.
            self.trackers.flush(self.step)
        self.watchdog.beat()

    # pragma: no mutate start
    def _requeue_after_fault(self, kind: str, say=lambda phrase: None) -> str:
        """Record a fault of this rank and requeue the SLURM job if the bound allows (see runtime/faults.py);
        `say(phrase)` prints the rank's line before the requeue runs."""
        out = self.out if self.out.is_dir() else None
        return record_and_requeue(out, self.faults, kind, self.cfg.fault.max_requeues, say)

    # pragma: no mutate end
    def resume(self) -> None:
        """Continue from the checkpoint `checkpoint.resume` names (auto: the newest complete one), if any."""
        path = self.checkpoints.resume(self.cfg.checkpoint.resume)
        self._main_writes(self._restart_metrics, path)
        self.last_eval = self.comm.broadcast_object(self.last_eval)  # rank 0 may have found the row (see below)

    def _restart_metrics(self, path: Path | None) -> None:
        if path is None:
            self.metrics.set_aside()  # a start from step 0 keeps the rows already there, never drops them
        dropped = self.metrics.truncate_after(self.step)
        rows, self.metrics.kept = self.metrics.kept, []
        self.trackers.start(self.step, rows, config_to_dict(self.cfg), fresh=path is None)
        if self.step in self.metrics.val_steps:
            # Runs finished by older versions saved the last step before its validation, so the checkpoint's
            # last_eval misses the row metrics.jsonl holds: without this, every rerun validated and appended again.
            self.last_eval = self.step
        if path is not None:
            (self.out / "PREEMPTED").unlink(missing_ok=True)
            log.info("resumed from step %d (%s); dropped %d metric lines past it", self.step, path, dropped)

    def _micro_batches(self):
        """Loader batches forever; the loader rolls over to the next epoch by itself."""
        while True:
            yield from self.data.train

    def train_step(self, micro: list, *, save_due: bool = False) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches; every rank takes the same decisions."""
        cfg = self.cfg
        cut_prob = cut_probability(self.step / self.plan.total_steps, cfg.mixmo.cut_prob)
        lr = self.schedule(self.step)
        set_lr(self.optimizer, lr)
        self.model.train()
        sums = torch.zeros(3 + cfg.mixmo.num_members, device=self.device)
        for i, (images_UCHW, labels_U) in enumerate(micro):
            last = i == len(micro) - 1
            with nullcontext() if last else self.acc.no_sync(self.model):
                loss, member_M, kappa, cut = self._forward_backward(images_UCHW, labels_U, cut_prob, len(micro))
            sums += torch.cat([loss.detach()[None], member_M.detach(), kappa[None], cut[None]]) / len(micro)
        local = torch.stack(
            [
                (~torch.isfinite(sums[0])).float(),
                torch.tensor(self.stop_signal.flag, device=self.device),
                torch.tensor(float(save_due), device=self.device),
                torch.tensor(self.guard.flag(), device=self.device),
                torch.tensor(float(self.write_error is not None), device=self.device),
            ]
        )
        bad, stop, due, data_failed, write_failed = self.comm.max(local).tolist()  # the one host sync of a step
        if write_failed:
            raise StopAllRanks(self.write_error or "", report=self.write_error is not None)
        grad_norm = None
        if data_failed:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.stop_if(data_failed)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite()
        else:
            self.nonfinite_run = 0
            logged = (self.step + 1) % cfg.log.every_n_steps == 0 or self.step + 1 == self.plan.stop_step
            if cfg.optim.clip_grad_norm or logged:  # the norm is a host sync: only where a row reports it
                max_norm = cfg.optim.clip_grad_norm or float("inf")
                grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.raw)
        self.step += 1
        m = cfg.mixmo.num_members
        return StepResult(
            sums[0],
            sums[1 : 1 + m],
            sums[1 + m],
            sums[2 + m],
            cut_prob,
            lr,
            grad_norm,
            bool(bad),
            stop,
            bool(due),
        )

    def _forward_backward(self, images_UCHW, labels_U, cut_prob: float, accum: int):
        """member inputs -> mixing sample -> model -> reweighted loss -> backward (scaled for accumulation)."""
        cfg = self.cfg.mixmo
        x_MRCHW, y_MR = member_inputs(
            images_UCHW,
            labels_U,
            num_members=cfg.num_members,
            repetitions=cfg.batch_repetitions,
            input_repetition=cfg.input_repetition,
            generator=self.generator,
            views=self.plan.views_per_image,
        )
        h, w = self.raw.encoder_output_hw(*x_MRCHW.shape[-2:])
        mix = sample_mixing(
            x_MRCHW.shape[1],
            cfg.num_members,
            h,
            w,
            mixing=cfg.mixing,
            alpha=cfg.alpha,
            cut_prob=cut_prob,
            generator=self.generator,
            device=self.device,
        )
        targets = y_MR
        if cfg.input_cutmix_prob > 0:
            x_MRCHW, targets = input_cutmix(
                x_MRCHW, y_MR, mix, self.num_classes, cfg.input_cutmix_prob, self.generator, encoder_hw=(h, w)
            )
        with self.acc.autocast():
            logits_MRK = self.model(x_MRCHW, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        weights_MR = reweight(mix.lam_MB, cfg.weight_root)
        loss, member_M = mixmo_loss(logits_MRK, targets, weights_MR, self.cfg.optim.label_smoothing)
        if self.step in self.fault_nan:
            loss = loss * float("nan")
        with self.faults.during("gradient all-reduce (DDP backward)"):
            self.acc.backward(loss / accum)
        return loss, member_M, mix.lam_MB.mean(), mix.is_cut.float()

    def _settle(self, batch) -> None:  # pragma: no mutate block (3+ ranks only: test_world_size.py)
        self.model.train()
        cut_prob = cut_probability(self.step / self.plan.total_steps, self.cfg.mixmo.cut_prob)
        self._forward_backward(*batch, cut_prob, 1)

    def _count_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss on at least one rank; all ranks skip this step", self.step)
        limit = self.cfg.optim.max_nonfinite_steps
        if self.nonfinite_run >= limit:
            raise RuntimeError(
                f"{self.nonfinite_run} consecutive non-finite losses (optim.max_nonfinite_steps={limit}) at step "
                f"{self.step}: lower optim.lr, enable optim.clip_grad_norm, or check the data; the last complete "
                f"checkpoint in {self.checkpoints.store.root} is intact"
            )

    def _train_record(self, res: StepResult, rows_per_s: float, data_time: float, compute_time: float) -> dict:
        m = self.cfg.mixmo.num_members
        stats = self.comm.mean(torch.cat([res.loss[None], res.member_losses, res.kappa_mean[None], res.cut[None]]))
        values = stats.tolist()
        rec = {"split": "train", "step": self.step, "epoch": round(self.epoch, 4), "loss": values[0]}
        rec.update({f"loss_member_{i}": values[1 + i] for i in range(m)})
        rec.update(
            lr=res.lr,
            img_per_s=rows_per_s,
            unique_img_per_s=rows_per_s / self.cfg.mixmo.batch_repetitions,
            data_time=data_time,
            compute_time=compute_time,
            kappa_mean=values[1 + m],
            cut_share=values[2 + m],
            cut_prob=res.cut_prob,
            grad_norm=res.grad_norm,
            nonfinite_skipped=self.nonfinite_total,
        )
        return rec

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact validation over all ranks (every image once) with the EMA weights when EMA is on."""
        model = self.ema.module if self.ema is not None else self.raw
        was_training = model.training
        model.eval()
        acc = EvalAccumulator(self.cfg.mixmo.num_members, self.num_classes, self.device)
        with self.faults.during("validation"):
            self.comm.sync_buffers(self.raw)
            if model is not self.raw:
                # The EMA's BatchNorm statistics follow each rank's own batches too: validate every rank with rank
                # 0's, which is what a checkpoint holds (a resume loads them everywhere).
                self.comm.sync_buffers(model)
            for images_BCHW, labels_B in self.guard.iterate(self.data.val):
                with self.acc.autocast():
                    logits_MBK = model(images_BCHW)
                acc.update(logits_MBK.float(), labels_B)
                self.watchdog.beat()
            self.guard.agree()
            result = acc.compute(reduce=self.comm.sum if self.world > 1 else None)
        self.last_eval = self.step
        model.train(was_training)
        return result

    def _log_val(self, result: dict) -> None:
        self.best.update(self.step, result["top1"])  # on every rank: it is part of the checkpointed counters
        if not self.acc.is_main_process:
            return
        rec = {"split": "val", "step": self.step, "epoch": round(self.epoch, 4)}
        rec.update({k: v for k, v in result.items() if k != "reliability"})
        rec.update(self.best.record())
        self._append_metrics(rec)
        members = " ".join(f"{v:.3f}" for v in result["member_top1"])
        log.info(
            "val step %d: top1 %.4f top5 %.4f nll %.4f ece %.4f members %s (best %.4f at step %d, %s split)",
            *(self.step, result["top1"], result["top5"], result["nll"], result["ece"], members),
            *(self.best.top1, self.best.step, self.best.split),
        )

    # Stopping on a signal and rank 0's start files (checked by test_preemption.py, test_interrupt.py and
    # test_faults.py, in subprocesses).
    # pragma: no mutate block
    # -- ending -----------------------------------------------------------------------------------------------
    def _stopped(self, how: float) -> str:
        status = "interrupted" if how == INTERRUPT else "preempted"
        received = [name for name in self.comm.gather_objects(self.stop_signal.received) if name]
        if self.acc.is_main_process:
            signal_name = received[0] if received else None  # the signal may have reached another rank only
            write_json_atomic(self.out / "PREEMPTED", {"step": self.step, "signal": signal_name, "time": time.time()})
            job = os.environ.get("SLURM_JOB_ID")
            if status == "preempted" and os.environ.get("MIXMO_REQUEUE_CMD") == "scontrol" and job:
                log.info("requeueing SLURM job %s", job)
                subprocess.run(["scontrol", "requeue", job], check=False)
        log.warning(
            "stopped at step %d after %s; the run resumes from its checkpoint",
            self.step,
            self.stop_signal.received or "a signal on another rank",
        )
        return status

    def _main_writes(self, write, *args) -> None:
        """Rank 0's files at the start of a run; a failed write (a full disk, a quota) stops every rank with one line
        naming the file, so no rank is left waiting for rank 0 in the first step."""
        error = None
        if self.acc.is_main_process:
            try:
                write(*args)
            except OSError as err:
                error = (
                    f"cannot write {err.filename or self.out}: {err.strerror or err}; free space there or choose "
                    f"another run.output_dir (now {self.out})"
                )
            except TrackerError as err:
                error = str(err)
        error = self.comm.broadcast_object(error)
        if error is not None:
            raise ValueError(error)

    def _write_run_json(self) -> None:
        hosts, threads = zip(*self.comm.gather_objects((socket.gethostname(), torch.get_num_threads())))
        self._main_writes(self._write_start_files, list(hosts), list(threads))

    def _write_start_files(self, hosts: list[str], threads: list[int]) -> None:
        dump_config(self.cfg, self.out / "config.yaml")
        info = run_info(self.cfg, self.acc, self.raw, self.data, hosts, asdict(self.plan), threads)
        with naming_the_file(self.out / "run.json"):
            write_json_atomic(self.out / "run.json", info)
        brief = ("world_size", "device", "mixed_precision", "num_threads", "num_threads_from", "num_params", "backend")
        log.info("run: %s", json.dumps({k: info[k] for k in brief}))
        for change in self.cfg.adaptations:
            log.info("config: %s", change)
        log.info("plan: %s", json.dumps(asdict(self.plan)))

    def close(self, *, drain_trackers: bool = True) -> None:
        """End of the run on this rank, after its last collective: rank 0 gives the trackers up to
        `log.tracker_timeout_s` to send their queued rows (none with `drain_trackers=False`), then the run directory's
        lock is released (no tracker thread writes trackers.json after that)."""
        self.trackers.close(self.cfg.log.tracker_timeout_s if drain_trackers else None)
        if self.lock is not None:
            self.lock.release()
