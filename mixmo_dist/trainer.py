"""The training flow: the only module that knows the order of the stages.

loader batch -> member inputs (repetition + shuffles) -> sampled mixing -> model (encoders, mixing, core, heads)
-> reweighted loss -> agreed step (non-finite skip, stop/save flags) -> optimizer -> metrics / checkpoint.

Shape legend: M members, U unique images per rank per micro-batch, R = U * repetitions rows, K classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mixmo_dist import __version__
from mixmo_dist.checkpoint import CheckpointError, CheckpointStore, RunLock
from mixmo_dist.config import Config, ConfigError, config_to_dict, dump_config
from mixmo_dist.data import build_data, timm_mean_std
from mixmo_dist.loss import mixmo_loss, reweight
from mixmo_dist.members import member_inputs
from mixmo_dist.metrics import EvalAccumulator
from mixmo_dist.model import build_model
from mixmo_dist.ops import cut_probability, sample_mixing
from mixmo_dist.optim import EMA, build_optimizer, build_schedule, scaled_lr, set_lr
from mixmo_dist.reporting import MetricsLog, Progress, metric_columns, write_json_atomic
from mixmo_dist.runtime import StopSignal, capture_rng, rank_seed, restore_rng, seed_everything

log = logging.getLogger("mixmo_dist")

# Settings a checkpoint cannot be resumed across: they change tensor shapes, the data position or the RNG streams.
SHAPE_KEYS = ("arch", "num_members", "num_classes", "rows_per_rank", "world_size", "classes")


@dataclass(frozen=True)
class Plan:
    """Derived sizes and lengths of a run (computed here, logged in run.json, never written back to the config)."""

    world_size: int
    rows_per_rank: int
    unique_per_rank: int
    grad_accum_steps: int
    micro_batches_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    stop_step: int
    unique_per_step: int
    lr: float
    eval_every_steps: int


def rows_per_rank(data_cfg, world_size: int) -> int:
    """Rows per rank per micro-batch: `data.batch_size`, or `data.global_batch_size / world size`."""
    if data_cfg.global_batch_size is None:
        return data_cfg.batch_size
    if data_cfg.global_batch_size % world_size:
        raise ConfigError(
            f"config key data.global_batch_size: {data_cfg.global_batch_size} rows are not divisible by the world "
            f"size {world_size}"
        )
    return data_cfg.global_batch_size // world_size


def build_plan(cfg: Config, world_size: int, micro_batches_per_epoch: int) -> Plan:
    rows = rows_per_rank(cfg.data, world_size)
    reps = cfg.mixmo.batch_repetitions
    if rows % reps:
        raise ConfigError(f"config key mixmo.batch_repetitions: {reps} does not divide the {rows} rows per rank")
    accum = cfg.optim.grad_accum_steps
    steps_per_epoch = micro_batches_per_epoch / accum
    total = max(1, math.ceil(cfg.schedule.epochs * steps_per_epoch))
    stop = total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)
    unique_per_step = rows // reps * world_size * accum
    return Plan(
        world_size=world_size,
        rows_per_rank=rows,
        unique_per_rank=rows // reps,
        grad_accum_steps=accum,
        micro_batches_per_epoch=micro_batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        stop_step=stop,
        unique_per_step=unique_per_step,
        lr=scaled_lr(cfg.optim.lr, cfg.optim.lr_reference_batch, unique_per_step),
        eval_every_steps=max(1, round(cfg.eval.every_n_epochs * steps_per_epoch)),
    )


def _fault_nan_steps(rank: int) -> set[int]:
    """Test hook: MIXMO_FAULT_NAN="RANK:STEP[,STEP...]" makes that rank's loss NaN at those steps."""
    spec = os.environ.get("MIXMO_FAULT_NAN", "")
    if not spec:
        return set()
    who, _, steps = spec.partition(":")
    return {int(s) for s in steps.split(",") if s} if int(who) == rank else set()


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
    stop: bool
    save_due: bool


class Trainer:
    """Builds every stage from the config, then `fit()` runs the loop; all trainer state is registered in
    `checkpoint_state`/`load_checkpoint_state` so a requeue resumes exactly."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.out = Path(cfg.run.output_dir)
        self.lock = self._acquire_lock()
        seed_everything(cfg.run.seed, self.rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rank_seed(cfg.run.seed, self.rank, 1))
        self.data = self._build_data()
        self.plan = build_plan(cfg, self.world, len(self.data.train))
        self.num_classes = self._num_classes()
        model = build_model(cfg.model.arch, cfg.mixmo.num_members, self.num_classes)
        if cfg.model.init_from:
            from mixmo_dist.export import init_from_vanilla

            init_from_vanilla(model, cfg.model.init_from)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(self.device)
        optimizer = build_optimizer(model, cfg.optim, self.plan.lr)
        self.schedule = build_schedule(cfg.schedule, self.plan.lr, self.plan.steps_per_epoch, self.plan.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw = accelerator.unwrap_model(self.model)
        if cfg.model.compile:
            self.raw.forward_train = torch.compile(self.raw.forward_train)
        self.ema = EMA(self.raw, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.store = CheckpointStore(self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.metrics = MetricsLog(self.out, metric_columns(cfg.mixmo.num_members))
        self.stop_signal = StopSignal()
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.fault_nan = _fault_nan_steps(self.rank)

    # -- building ---------------------------------------------------------------------------------------------
    def _acquire_lock(self) -> RunLock | None:
        """Rank 0 takes the output directory's lock; every rank learns the outcome so all stop together."""
        error, lock = None, None
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.out)
            try:
                lock.acquire()
            except CheckpointError as err:
                error, lock = str(err), None
        error = self._broadcast(error)
        if error:
            raise CheckpointError(error)
        return lock

    def _build_data(self):
        cfg = self.cfg
        rows = rows_per_rank(cfg.data, self.world)
        mean, std = timm_mean_std(cfg.model.arch)
        return build_data(
            cfg.data,
            unique_per_rank=max(1, rows // cfg.mixmo.batch_repetitions),
            val_batch_size=cfg.data.val_batch_size or rows,
            rank=self.rank,
            world_size=self.world,
            seed=cfg.run.seed,
            device=self.device,
            channels_last=cfg.model.channels_last,
            mean=mean,
            std=std,
        )

    def _num_classes(self) -> int:
        found = len(self.data.classes)
        wanted = self.cfg.model.num_classes
        if wanted is not None and wanted != found:
            raise ConfigError(f"config key model.num_classes: {wanted}, but {self.cfg.data.root} has {found} classes")
        return found

    # -- collectives ------------------------------------------------------------------------------------------
    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_max(self, flags: torch.Tensor) -> list[float]:
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist()  # the one host sync of a step

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BN statistics (DDP broadcasts them only at the start of each forward, so after a
        step each rank holds its own); evaluation and checkpoints then see one model."""
        if self.world > 1:
            for buf in self.raw.buffers():
                dist.broadcast(buf, src=0)

    def _all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until the stop step (or a preemption signal). Returns "completed" or "preempted"."""
        self.resume()
        self._write_run_json()
        self.stop_signal.install()
        progress = Progress(self.plan.stop_step, self.step, self.cfg.log.progress, self.cfg.log.every_n_steps)
        batches = self._micro_batches()
        last_save, last_eval = time.monotonic(), -1
        window_t0, window_rows = time.monotonic(), 0
        saved_at = self.step if self.step > 0 else -1
        try:
            while self.step < self.plan.stop_step:
                t0 = time.monotonic()
                micro = [next(batches) for _ in range(self.plan.grad_accum_steps)]
                t1 = time.monotonic()
                due = self.cfg.checkpoint.every_n_minutes is not None and (
                    time.monotonic() - last_save >= 60 * self.cfg.checkpoint.every_n_minutes
                )
                res = self.train_step(micro, save_due=due)
                t2 = time.monotonic()
                window_rows += self.plan.rows_per_rank * self.world * self.plan.grad_accum_steps
                if self.step % self.cfg.log.every_n_steps == 0 or res.stop:
                    rec = self._train_record(res, window_rows / max(t2 - window_t0, 1e-9), t1 - t0, t2 - t1)
                    window_t0, window_rows = time.monotonic(), 0
                    if self.acc.is_main_process:
                        self.metrics.append(rec)
                        progress.update(self.step, rec)
                        self.acc.log({f"train/{k}": v for k, v in rec.items() if isinstance(v, float)}, self.step)
                if self.step % self.plan.eval_every_steps == 0:
                    self._log_val(self.evaluate())
                    last_eval = self.step
                every = self.cfg.checkpoint.every_n_steps
                if res.stop or res.save_due or (every and self.step % every == 0):
                    self.save()
                    saved_at, last_save = self.step, time.monotonic()
                if res.stop:
                    return self._preempted()
            if self.cfg.eval.at_end and last_eval != self.step:
                self._log_val(self.evaluate())
            if saved_at != self.step:
                self.save()
            return "completed"
        finally:
            progress.close()
            self.stop_signal.uninstall()

    def _micro_batches(self):
        """Loader batches forever; the loader rolls over to the next epoch by itself."""
        while True:
            yield from self.data.train

    @property
    def epoch(self) -> float:
        return self.step * self.plan.grad_accum_steps / self.plan.micro_batches_per_epoch

    def train_step(self, micro: list, *, save_due: bool = False) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches; every rank takes the same decisions."""
        cfg, raw = self.cfg, self.raw
        progress = self.step / self.plan.total_steps
        cut_prob = cut_probability(progress, cfg.mixmo.cut_prob)
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
                torch.tensor(float(self.stop_signal.received is not None), device=self.device),
                torch.tensor(float(save_due), device=self.device),
            ]
        )
        bad, stop, due = self._all_max(local)
        grad_norm = None
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite()
        else:
            self.nonfinite_run = 0
            if cfg.optim.clip_grad_norm or (self.step + 1) % cfg.log.every_n_steps == 0:
                max_norm = cfg.optim.clip_grad_norm or float("inf")
                grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(raw)
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
            bool(stop),
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
        )
        rows = x_MRCHW.shape[1]
        h, w = self.raw.encoder_output_hw(*x_MRCHW.shape[-2:])
        mix = sample_mixing(
            rows,
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
            from mixmo_dist.input_cutmix import input_cutmix

            x_MRCHW, targets = input_cutmix(
                x_MRCHW, y_MR, mix, self.num_classes, cfg.input_cutmix_prob, self.generator, encoder_hw=(h, w)
            )
        with self.acc.autocast():
            logits_MRK = self.model(x_MRCHW, mix.boxes_B4, mix.coef_in_MB, mix.coef_out_MB)
        loss, member_M = mixmo_loss(
            logits_MRK, targets, reweight(mix.lam_MB, cfg.weight_root), self.cfg.optim.label_smoothing
        )
        if self.step in self.fault_nan:
            loss = loss * float("nan")
        self.acc.backward(loss / accum)
        return loss, member_M, mix.lam_MB.mean(), mix.is_cut.float()

    def _count_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss on at least one rank; all ranks skip this step", self.step)
        limit = self.cfg.optim.max_nonfinite_steps
        if self.nonfinite_run >= limit:
            raise RuntimeError(
                f"{self.nonfinite_run} consecutive non-finite losses (optim.max_nonfinite_steps={limit}) at step "
                f"{self.step}: lower optim.lr, enable optim.clip_grad_norm, or check the data; the last complete "
                f"checkpoint in {self.store.root} is intact"
            )

    def _train_record(self, res: StepResult, rows_per_s: float, data_time: float, compute_time: float) -> dict:
        m = self.cfg.mixmo.num_members
        stats = self._all_mean(torch.cat([res.loss[None], res.member_losses, res.kappa_mean[None], res.cut[None]]))
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
        self._sync_buffers()
        model = self.ema.module if self.ema is not None else self.raw
        was_training = model.training
        model.eval()
        acc = EvalAccumulator(self.cfg.mixmo.num_members, self.num_classes, self.device)
        for images_BCHW, labels_B in self.data.val:
            with self.acc.autocast():
                logits_MBK = model(images_BCHW)
            acc.update(logits_MBK.float(), labels_B)
        result = acc.compute(reduce=self._all_sum if self.world > 1 else None)
        model.train(was_training)
        return result

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _log_val(self, result: dict) -> None:
        if not self.acc.is_main_process:
            return
        rec = {"split": "val", "step": self.step, "epoch": round(self.epoch, 4)}
        rec.update({k: v for k, v in result.items() if k != "reliability"})
        self.metrics.append(rec)
        members = " ".join(f"{v:.3f}" for v in result["member_top1"])
        log.info(
            "val step %d: top1 %.4f top5 %.4f nll %.4f ece %.4f members %s",
            self.step,
            result["top1"],
            result["top5"],
            result["nll"],
            result["ece"],
            members,
        )
        self.acc.log({f"val/{k}": v for k, v in rec.items() if isinstance(v, float)}, self.step)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def shape_settings(self) -> dict:
        return {
            "arch": self.cfg.model.arch,
            "num_members": self.cfg.mixmo.num_members,
            "num_classes": self.num_classes,
            "rows_per_rank": self.plan.rows_per_rank,
            "world_size": self.world,
            "classes": list(self.data.classes),
        }

    def rank_state(self) -> dict:
        """This rank's share of the trainer state: RNG streams and data position."""
        return {
            "rng": capture_rng(self.generator),
            "data": self.data.train.state_dict(),
            "param_fingerprint": _fingerprint(self.raw),
        }

    def save(self) -> Path | None:
        """Atomic checkpoint of the whole trainer state; per-rank state gathered to rank 0, which writes."""
        self._sync_buffers()
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, self.rank_state())
        else:
            states = [self.rank_state()]
        prints = {st["param_fingerprint"] for st in states}
        if len(prints) > 1:  # DDP keeps replicas equal; a difference means a desync worth stopping for
            raise RuntimeError(f"model replicas differ across ranks at step {self.step}: {sorted(prints)}")
        path = None
        if self.acc.is_main_process:
            tmp = self.store.begin(self.step)
            self.store.write_tensors(tmp, "model.safetensors", self.raw.state_dict())
            tensors, opt_meta = _optimizer_tensors(self.optimizer.state_dict())
            if self.ema is not None:
                tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
            self.store.write_tensors(tmp, "trainer.safetensors", tensors)
            scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "version": __version__,
                "shape": self.shape_settings(),
                "config": config_to_dict(self.cfg),
                "optimizer": opt_meta,
                "scaler": scaler,
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run,
                "schedule": {"step": self.step, "lr": self.schedule(self.step)},
                "plan": asdict(self.plan),
            }
            self.store.write_json(tmp, "state.json", state)
            for r, rank_state in enumerate(states):
                self.store.write_json(tmp, f"rank_{r}.json", rank_state)
            path = self.store.commit(tmp, self.step)
            log.info("saved checkpoint %s", path)
        self.acc.wait_for_everyone()
        return path

    def resume(self) -> None:
        """Continue from the checkpoint `checkpoint.resume` names (auto: the newest complete one), if any."""
        path = None
        if self.acc.is_main_process:
            self.store.cleanup_tmp()  # leftovers of saves killed mid-write
            path = self.store.resolve(self.cfg.checkpoint.resume)
            path = str(path) if path else None
        path = self._broadcast(path)
        if path is None:
            if self.acc.is_main_process:
                self.metrics.truncate_after(0)
            return
        state = self.store.read_json(path, "state.json")
        self._check_compatible(state, path)
        self.raw.load_state_dict(self.store.read_tensors(path, "model.safetensors"), strict=True)
        tensors = self.store.read_tensors(path, "trainer.safetensors")
        self.optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        rank_state = self.store.read_json(path, f"rank_{self.rank}.json")
        self.data.train.load_state_dict(rank_state["data"])
        restore_rng(rank_state["rng"], self.generator)
        if self.acc.is_main_process:
            dropped = self.metrics.truncate_after(self.step)
            (self.out / "PREEMPTED").unlink(missing_ok=True)
            log.info("resumed from step %d (%s); dropped %d metric lines past it", self.step, path, dropped)

    def _check_compatible(self, state: dict, path: str) -> None:
        saved, now = state.get("shape", {}), self.shape_settings()
        diffs = []
        for key in SHAPE_KEYS:
            if saved.get(key) != now[key]:
                shown = (saved.get(key), now[key]) if key != "classes" else ("<list>", "<list>")
                diffs.append(f"{key}: checkpoint {shown[0]!r} vs now {shown[1]!r}")
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: " + "; ".join(diffs) + ". Resuming needs the same shape-defining "
                "settings and world size (per-rank data positions and RNG streams cannot be remapped); start a new "
                "run in another run.output_dir (model.init_from can start it from these weights) or set "
                "checkpoint.resume=never"
            )

    def _preempted(self) -> str:
        if self.acc.is_main_process:
            write_json_atomic(
                self.out / "PREEMPTED", {"step": self.step, "signal": self.stop_signal.received, "time": time.time()}
            )
            job = os.environ.get("SLURM_JOB_ID")
            if os.environ.get("MIXMO_REQUEUE_CMD") == "scontrol" and job:
                log.info("requeueing SLURM job %s", job)
                subprocess.run(["scontrol", "requeue", job], check=False)
        log.warning(
            "stopped at step %d after %s; the run resumes from its checkpoint",
            self.step,
            self.stop_signal.received or "a signal on another rank",
        )
        return "preempted"

    def _write_run_json(self) -> None:
        if not self.acc.is_main_process:
            return
        dump_config(self.cfg, self.out / "config.yaml")
        info = {
            "world_size": self.world,
            "device": str(self.device) + (f" ({torch.cuda.get_device_name()})" if self.device.type == "cuda" else ""),
            "mixed_precision": str(self.acc.mixed_precision),
            "num_params": sum(p.numel() for p in self.raw.parameters()),
            "version": __version__,
            "git_commit": _git_commit(),
            "backend": self.data.backend,
            "classes": list(self.data.classes),
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "num_train": self.data.num_train,
            "num_val": self.data.num_val,
            "plan": asdict(self.plan),
            "config": config_to_dict(self.cfg),
        }
        write_json_atomic(self.out / "run.json", info)
        log.info(
            "run: %s",
            json.dumps({k: info[k] for k in ("world_size", "device", "mixed_precision", "num_params", "backend")}),
        )
        log.info("plan: %s", json.dumps(asdict(self.plan)))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.acc.end_training()


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON metadata (no pickle)."""
    tensors, meta_state = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{idx}/{key}"] = value
            else:
                meta_state.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": meta_state}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta["state"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def _fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes: equal across ranks iff the replicas are bit-identical."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
