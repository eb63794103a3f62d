"""Typed run configuration: one frozen dataclass per section, and the only code that reads YAML or argv.

A config is built from three layers, later ones winning: the dataclass defaults (the CPU demo), an optional YAML
file (`--config FILE`, a mapping of sections to mappings of keys) and command-line overrides
(`--section.key=value` or `--section.key value`). Every layer goes through the same strict path: unknown sections or
keys, type mismatches and out-of-range values raise `ConfigError`, whose one-line message names the key (and the
valid choices or keys). Entry points catch `ConfigError`, print `error: <message>` to stderr and exit with status 2.

Sections only hold what the user sets; derived values (per-rank rows, scaled LR, steps per epoch) are computed by
the builders that use them, never written back here.
"""

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "MixMoConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "SlurmConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "format_overrides",
    "load_config",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A user error in the configuration (file, command line or stored dict); the message is one line.

    Attributes:
        key: the `section.key` the error is about, or None when it is about no single key (e.g. a bad file).
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _fail(key: str, detail: str) -> typing.NoReturn:
    raise ConfigError(f"config key {key}: {detail}", key=key)


# --------------------------------------------------------------------------------------------------------------
# Type coercion, driven by the field annotations.
# --------------------------------------------------------------------------------------------------------------

_NULL_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")


class _Mismatch(Exception):
    """Internal: a value does not fit a type; `_coerce` turns it into a ConfigError naming the key."""

    def __init__(self, expected: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected


def _optional_inner(tp: Any) -> Any | None:
    """The X of `X | None`, or None when `tp` is not optional."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise AssertionError(f"unsupported union annotation {tp!r}")  # only `X | None` is used in this module
    return None


def _is_text_type(tp: Any) -> bool:
    """True for str, Literal[str, ...] and their `| None` forms: fields whose command-line text is kept raw."""
    inner = _optional_inner(tp)
    tp = inner if inner is not None else tp
    return tp is str or typing.get_origin(tp) is Literal


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}s"
    return {int: "an int", float: "a float", bool: "a bool (true/false/yes/no/1/0)", str: "a string"}[tp]


def _to_int(value: Any) -> int:
    # bool is an int subclass: `batch_size: true` is a typo, not 1.
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        # PyYAML reads `1e3` as a string (YAML 1.1 floats need a dot); accept it when it is a whole number.
        try:
            number = float(text)
        except ValueError:
            raise _Mismatch from None
        if number.is_integer():
            return int(number)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML loads `1e-4` as the string '1e-4'; this is where it becomes a number.
        try:
            number = float(value.strip())
        except ValueError:
            raise _Mismatch from None
    else:
        raise _Mismatch
    if not math.isfinite(number):
        raise _Mismatch("a finite float")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _Mismatch


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    # An unquoted `2024` or `2024-01-01` in YAML is a number or a date; guessing its spelling back would be lossy.
    raise _Mismatch("a string (quote it in YAML)")


def _to_choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    # YAML 1.1 reads an unquoted `no` (and `off`) as False: `mixed_precision: no` must still mean "no".
    if value is False and "no" in choices:
        value = "no"
    if not isinstance(value, str) or value not in choices:
        _fail(key, f"invalid value {value!r}; valid choices: {', '.join(choices)}")
    return value


def _coerce(value: Any, tp: Any, key: str, label: str | None = None, shown: Any = None) -> Any:
    """Convert `value` to the annotation `tp` under the rules of this module, or raise ConfigError naming `key`.

    Args:
        value: the raw value (from YAML, the command line, a stored dict or a Python caller).
        tp: the field's annotation: int, float, bool, str, Literal[...], tuple[X, ...] or `X | None`.
        key: `section.key`, stored on the error.
        label: how to name the value in the message (defaults to `key`; list items add `[i]`).
        shown: the annotation described in a type-mismatch message (defaults to `tp`; `X | None` passes itself).
    """
    label = label or key
    shown = shown or tp
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        return _coerce(value, inner, key, label, shown=tp)
    if typing.get_origin(tp) is Literal:
        return _to_choice(value, typing.get_args(tp), label)
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, list | tuple):
            return tuple(_coerce(item, item_tp, key, f"{label}[{i}]") for i, item in enumerate(value))
        if value is None or isinstance(value, Mapping):
            raise ConfigError(
                f"config key {label}: expected {_describe(shown)}, got {value!r} ({type(value).__name__})", key=key
            )
        return (_coerce(value, item_tp, key, f"{label}[0]"),)  # a scalar is a one-element list
    convert = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}[tp]
    try:
        return convert(value)
    except _Mismatch as mismatch:
        expected = mismatch.expected or _describe(shown)
        raise ConfigError(
            f"config key {label}: expected {expected}, got {value!r} ({type(value).__name__})", key=key
        ) from None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------------------------------


class _Section:
    """Base of every section: coerces each field to its annotation, then runs the section's own checks."""

    _section: ClassVar[str]
    """The section's name in YAML and on the command line (`optim` for `--optim.lr`)."""

    def __init_subclass__(cls, *, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section

    def __post_init__(self) -> None:
        for name, tp in _field_types(type(self)).items():
            # The dataclass is frozen; __post_init__ is the one place allowed to store the coerced value.
            object.__setattr__(self, name, _coerce(getattr(self, name), tp, f"{self._section}.{name}"))
        self._validate()

    def _validate(self) -> None:
        """Range and cross-field checks of the section; raise ConfigError through `_check`."""

    def _check(self, name: str, ok: bool, requirement: str) -> None:
        if not ok:
            _fail(f"{self._section}.{name}", f"must be {requirement}, got {getattr(self, name)!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Section, section="run"):
    """Identity and reproducibility of a run."""

    name: str = "demo"
    """Run name, used in logs and as the default SLURM job name."""
    output_dir: str = "runs/demo"
    """Directory for the resolved config, metrics, TensorBoard logs and checkpoints/ (created if missing)."""
    seed: int = 0
    """Base seed; every rank derives its own generators from it and its global rank."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast dtype: auto follows the launcher's --mixed_precision; an explicit value wins over the launcher."""

    def _validate(self) -> None:
        self._check("name", bool(self.name.strip()), "a non-empty string")
        self._check("output_dir", bool(self.output_dir.strip()), "a non-empty path")
        # Per-rank seeds are seed + rank and numpy-style seeders take 32 bits.
        self._check("seed", 0 <= self.seed < 2**31, "in [0, 2**31)")


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section, section="data"):
    """Where the images come from, how they are decoded, augmented and batched."""

    root: str = "data/demo"
    """Dataset root holding train/ and val/ class folders (ignored by the synthetic backend)."""
    dataset: Literal["imagefolder", "cifar10", "cifar100", "tinyimagenet"] = "imagefolder"
    """Dataset layout and normalisation statistics to use."""
    backend: Literal["auto", "dali-gpu", "dali-cpu", "torch", "synthetic"] = "auto"
    """Loader: auto picks dali-gpu on CUDA, dali-cpu without CUDA, torch when DALI is not installed; synthetic
    generates random tensors (benchmarks)."""
    image_size: int = 32
    """Side of the square training and validation crops, in pixels."""
    val_resize_ratio: float = 0.875
    """Validation resizes the shorter side to image_size / val_resize_ratio, then center-crops image_size."""
    batch_size: int = 64
    """Rows per rank per step, counting batch repetitions (rows / mixmo.batch_repetitions unique images)."""
    global_batch_size: int | None = None
    """Rows per step over all ranks; when set it replaces batch_size (per-rank rows = global / world size)."""
    val_batch_size: int | None = None
    """Validation images per rank per step; null = batch_size."""
    num_workers: int = 2
    """Decoding worker processes per rank for the torch backend."""
    worker_timeout_s: float = 600.0
    """Torch backend: longest wait for one batch from the workers before the run stops with an error naming this
    key (a stuck worker, e.g. on a hung file system, would otherwise hang every rank); 0 waits forever."""
    train_crop: Literal["random_resized", "pad_random"] = "random_resized"
    """Training crop: RandomResizedCrop (ImageNet) or pad-4 random crop (CIFAR / Tiny ImageNet recipes)."""
    min_crop_scale: float = 0.25
    """Smallest area fraction kept by the random resized crop."""
    hflip: bool = True
    """Random horizontal flip in training."""
    dali_threads: int = 2
    """CPU threads per DALI pipeline."""
    dali_prefetch: int = 2
    """Batches DALI prepares ahead (prefetch queue depth)."""
    synthetic_size: int = 1024
    """Number of samples of the synthetic backend's training split."""
    num_synthetic_classes: int = 10
    """Number of classes of the synthetic backend."""

    def _validate(self) -> None:
        self._check("root", bool(self.root.strip()), "a non-empty path")
        self._check("image_size", self.image_size >= 8, ">= 8")
        self._check("val_resize_ratio", 0 < self.val_resize_ratio <= 1, "in (0, 1]")
        self._check("batch_size", self.batch_size >= 1, ">= 1")
        self._check("global_batch_size", self.global_batch_size is None or self.global_batch_size >= 1, ">= 1 or null")
        self._check("val_batch_size", self.val_batch_size is None or self.val_batch_size >= 1, ">= 1 or null")
        self._check("num_workers", self.num_workers >= 0, ">= 0")
        self._check("worker_timeout_s", self.worker_timeout_s >= 0, ">= 0 (0 waits forever)")
        self._check("min_crop_scale", 0 < self.min_crop_scale <= 1, "in (0, 1]")
        self._check("dali_threads", self.dali_threads >= 1, ">= 1")
        self._check("dali_prefetch", self.dali_prefetch >= 1, ">= 1")
        self._check("synthetic_size", self.synthetic_size >= 1, ">= 1")
        self._check("num_synthetic_classes", self.num_synthetic_classes >= 2, ">= 2")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section, section="model"):
    """The timm backbone that is converted into a MixMo network."""

    arch: str = "resnet18"
    """timm model name of a ResNet-family backbone (resnet18/50, wide_resnet50_2, resnet50d, ...)."""
    num_classes: int | None = None
    """Number of classes K; null = number of class folders (when set it must match the data)."""
    channels_last: bool = True
    """Use the channels_last memory format for activations and weights."""
    compile: bool = False
    """Wrap the training step in torch.compile."""
    init_from: str | None = None
    """Path of a vanilla (timm) checkpoint to initialise the backbone from; null = timm's random init."""

    def _validate(self) -> None:
        self._check("arch", bool(self.arch.strip()), "a non-empty timm model name")
        self._check("num_classes", self.num_classes is None or self.num_classes >= 2, ">= 2 or null")
        self._check("init_from", self.init_from is None or bool(self.init_from.strip()), "a non-empty path or null")


@dataclass(frozen=True, kw_only=True)
class MixMoConfig(_Section, section="mixmo"):
    """The MixMo method: members, mixing block, loss reweighting and batch construction."""

    num_members: int = 2
    """Number of subnetworks M (encoder + head pairs); 1 with mixing none is the vanilla baseline."""
    mixing: Literal["cut", "linear", "none"] = "cut"
    """Mixing block in training: cut (Cut-MixMo, rectangles with probability p), linear (Linear-MixMo), none."""
    alpha: float = 2.0
    """Dirichlet concentration of the mixing ratios kappa; 0 = fixed 1/M (MIMO)."""
    cut_prob: float = 0.5
    """p0: probability that a batch uses rectangles instead of linear mixing (decays to 0 over the last 1/12)."""
    weight_root: float = 3.0
    """r of the loss weights w_m = M kappa_m^(1/r) / sum_j kappa_j^(1/r); 1 gives w = M kappa."""
    batch_repetitions: int = 2
    """b: each unique image appears b times in a batch, in a different random order per member."""
    input_repetition: float = 0.0
    """rho: fraction of rows where every member receives the same image (MIMO's ImageNet trick)."""
    input_cutmix_prob: float = 0.0
    """Probability of applying pixel-level CutMix to the inputs before the encoders (Cut-MixMo + CutMix)."""

    def _validate(self) -> None:
        self._check("num_members", self.num_members >= 1, ">= 1")
        self._check("alpha", self.alpha >= 0, ">= 0")
        self._check("cut_prob", 0 <= self.cut_prob <= 1, "in [0, 1]")
        self._check("weight_root", self.weight_root > 0, "> 0")
        self._check("batch_repetitions", self.batch_repetitions >= 1, ">= 1")
        self._check("input_repetition", 0 <= self.input_repetition <= 1, "in [0, 1]")
        self._check("input_cutmix_prob", 0 <= self.input_cutmix_prob <= 1, "in [0, 1]")
        if self.num_members == 1 and self.mixing != "none":
            _fail(
                "mixmo.mixing",
                f"{self.mixing!r} mixing needs mixmo.num_members >= 2, got num_members=1; "
                "the vanilla baseline (num_members=1) requires mixmo.mixing=none",
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section, section="optim"):
    """SGD, weight decay, loss options and step-level safety nets."""

    lr: float = 0.8
    """Peak learning rate for lr_reference_batch unique images per step; scaled linearly to the real count."""
    lr_reference_batch: int = 256
    """Unique images per step (over all ranks and accumulation steps) for which lr is given."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 5e-4
    """Decoupled-from-loss SGD weight decay coefficient."""
    wd_exclude_norm_bias: bool = True
    """Exclude normalisation layers and biases from weight decay (chosen by module type)."""
    label_smoothing: float = 0.0
    """Label smoothing of each member's cross-entropy (0 in the MixMo recipes)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value; null = no clipping."""
    ema_decay: float | None = None
    """Decay of an exponential moving average of the weights, evaluated alongside; null = no EMA."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss (those steps are skipped)."""

    def _validate(self) -> None:
        self._check("lr", self.lr > 0, "> 0")
        self._check("lr_reference_batch", self.lr_reference_batch >= 1, ">= 1")
        self._check("momentum", 0 <= self.momentum < 1, "in [0, 1)")
        self._check("weight_decay", self.weight_decay >= 0, ">= 0")
        self._check("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)")
        self._check("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1")
        self._check("clip_grad_norm", self.clip_grad_norm is None or self.clip_grad_norm > 0, "> 0 or null")
        self._check("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1) or null")
        self._check("max_nonfinite_steps", self.max_nonfinite_steps >= 1, ">= 1")
        # torch.optim.SGD refuses nesterov without momentum only when the optimizer is built; fail at load instead.
        if self.nesterov and self.momentum == 0:
            _fail("optim.nesterov", "Nesterov needs optim.momentum > 0; set optim.nesterov=false or a momentum")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(_Section, section="schedule"):
    """Training length and learning-rate schedule (per step, warmup then cosine or step decay)."""

    epochs: float = 6.0
    """Training length in epochs (an epoch = every unique image seen batch_repetitions times per member)."""
    warmup_epochs: float = 1.0
    """Linear warmup from 0 to the peak LR over this many epochs, per step."""
    kind: Literal["cosine", "step"] = "cosine"
    """Decay after warmup: cosine to 0 at the end, or multiply by gamma at each milestone."""
    milestones: tuple[float, ...] = ()
    """Epochs at which kind=step multiplies the LR by gamma; increasing, each < epochs (a tuple: configs are frozen)."""
    gamma: float = 0.1
    """Factor applied at each milestone of kind=step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even if epochs are not done (the schedule still spans epochs)."""

    def _validate(self) -> None:
        self._check("epochs", self.epochs > 0, "> 0")
        self._check("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, f"in [0, schedule.epochs={self.epochs})")
        self._check("gamma", self.gamma > 0, "> 0")
        self._check("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or null")
        ms = self.milestones
        self._check("milestones", all(0 < m < self.epochs for m in ms), f"in (0, schedule.epochs={self.epochs})")
        self._check("milestones", all(a < b for a, b in zip(ms, ms[1:])), "strictly increasing")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section, section="checkpoint"):
    """When checkpoints are written, how many are kept, and how a run resumes."""

    every_n_steps: int | None = None
    """Save every this many optimizer steps; null = not by step count."""
    every_n_minutes: float | None = 30.0
    """Save when this many minutes passed since the last save; null = not by time."""
    keep_last: int = 3
    """Number of complete checkpoints kept; older ones are deleted after a new one is complete."""
    resume: str = "auto"
    """auto = resume from output_dir's latest complete checkpoint if any; never = start fresh; else a step dir."""

    def _validate(self) -> None:
        self._check("every_n_steps", self.every_n_steps is None or self.every_n_steps >= 1, ">= 1 or null")
        self._check("every_n_minutes", self.every_n_minutes is None or self.every_n_minutes > 0, "> 0 or null")
        self._check("keep_last", self.keep_last >= 1, ">= 1")
        self._check("resume", bool(self.resume.strip()), "auto, never or a checkpoint directory")


@dataclass(frozen=True, kw_only=True)
class LogConfig(_Section, section="log"):
    """Training-time logging."""

    every_n_steps: int = 10
    """Log loss, LR and throughput every this many optimizer steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files under output_dir."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console progress: a bar on a terminal, plain lines otherwise (auto), or forced."""

    def _validate(self) -> None:
        self._check("every_n_steps", self.every_n_steps >= 1, ">= 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(_Section, section="eval"):
    """Validation during training."""

    every_n_epochs: float = 1.0
    """Evaluate on the validation split every this many epochs (fractions allowed)."""
    at_end: bool = True
    """Evaluate once more after the last step."""

    def _validate(self) -> None:
        self._check("every_n_epochs", self.every_n_epochs > 0, "> 0")


@dataclass(frozen=True, kw_only=True)
class SlurmConfig(_Section, section="slurm"):
    """Job resources for the SLURM/submitit launchers (the trainer itself ignores this section)."""

    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 = CPU job)."""
    tasks_per_node: int | None = None
    """Tasks per node; null = max(1, gpus_per_node)."""
    cpus_per_task: int = 8
    """CPU cores per task."""
    mem_gb: int | None = None
    """Memory per node in GB; null = the partition's default."""
    partition: str | None = None
    """SLURM partition; null = the cluster's default."""
    account: str | None = None
    """SLURM account to charge; null = the user's default."""
    qos: str | None = None
    """SLURM quality of service; null = the default."""
    constraint: str | None = None
    """SLURM node feature constraint (e.g. a GPU model); null = none."""
    timeout_min: int = 60
    """Time limit of one job in minutes; longer trainings requeue."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which the job is signalled to checkpoint and requeue."""
    max_requeues: int = 20
    """Maximum number of automatic requeues (timeouts and preemptions)."""
    job_name: str | None = None
    """SLURM job name; null = run.name."""

    def _validate(self) -> None:
        self._check("nodes", self.nodes >= 1, ">= 1")
        self._check("gpus_per_node", self.gpus_per_node >= 0, ">= 0")
        self._check("tasks_per_node", self.tasks_per_node is None or self.tasks_per_node >= 1, ">= 1 or null")
        self._check("cpus_per_task", self.cpus_per_task >= 1, ">= 1")
        self._check("mem_gb", self.mem_gb is None or self.mem_gb >= 1, ">= 1 or null")
        self._check("timeout_min", self.timeout_min >= 1, ">= 1")
        self._check("max_requeues", self.max_requeues >= 0, ">= 0")
        # A signal at or before the job's start would leave no time to train.
        limit_s = 60 * self.timeout_min
        self._check("signal_delay_s", 0 <= self.signal_delay_s < limit_s, f"in [0, 60 * slurm.timeout_min={limit_s})")
        for name in ("partition", "account", "qos", "constraint", "job_name"):
            value = getattr(self, name)
            self._check(name, value is None or bool(value.strip()), "a non-empty string or null")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run configuration: one field per section; defaults reproduce the CPU demo."""

    run: RunConfig = field(default_factory=RunConfig)
    """Identity and reproducibility."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source, augmentation and batching."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and its conversion."""
    mixmo: MixMoConfig = field(default_factory=MixMoConfig)
    """MixMo method parameters."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and loss options."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Training length and LR schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation during training."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM resources (read by the launchers only)."""

    def __post_init__(self) -> None:
        for name, section_cls in _field_types(Config).items():
            value = getattr(self, name)
            if not isinstance(value, section_cls):
                raise ConfigError(
                    f"config section {name}: expected a {section_cls.__name__}, got {type(value).__name__}", key=name
                )
        # Checks that span sections; the world size is unknown here, so per-rank checks of
        # global_batch_size belong to the data builder.
        reps = self.mixmo.batch_repetitions
        if self.data.global_batch_size is None and self.data.batch_size % reps:
            _fail(
                "data.batch_size",
                f"{self.data.batch_size} rows per rank is not divisible by mixmo.batch_repetitions={reps} "
                "(each unique image fills batch_repetitions rows)",
            )
        if self.data.global_batch_size is not None and self.data.global_batch_size % reps:
            _fail(
                "data.global_batch_size",
                f"{self.data.global_batch_size} rows is not divisible by mixmo.batch_repetitions={reps}",
            )


def _sections() -> dict[str, type]:
    return _field_types(Config)


# --------------------------------------------------------------------------------------------------------------
# Dicts, YAML and the command line.
# --------------------------------------------------------------------------------------------------------------


def _suggest(word: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _check_section(section: Any, where: str) -> type:
    sections = _sections()
    if not isinstance(section, str) or section not in sections:
        raise ConfigError(
            f"unknown config section {section!r}{where}; valid sections: {', '.join(sections)}"
            + _suggest(str(section), list(sections)),
            key=str(section),
        )
    return sections[section]


def _check_key(section: str, key: Any, where: str) -> Any:
    """The annotation of `section.key`, or ConfigError listing the section's keys and the closest one."""
    types_by_key = _field_types(_sections()[section])
    if not isinstance(key, str) or key not in types_by_key:
        raise ConfigError(
            f"unknown config key {section}.{key}{where}; valid keys of {section}: {', '.join(types_by_key)}"
            + _suggest(str(key), list(types_by_key), f"{section}."),
            key=f"{section}.{key}",
        )
    return types_by_key[key]


def _build(d: Any, origins: Mapping[str, str]) -> Config:
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of sections to mappings of keys, got {type(d).__name__}")
    sections = {}
    try:
        for name, values in d.items():
            section_cls = _check_section(name, "")
            if values is None:  # `eval:` with nothing under it in YAML
                values = {}
            if not isinstance(values, Mapping):
                raise ConfigError(
                    f"config section {name} must be a mapping of keys, got {values!r} ({type(values).__name__})",
                    key=name,
                )
            for key in values:
                _check_key(name, key, "")
            sections[name] = section_cls(**values)
        return Config(**sections)
    except ConfigError as err:
        # A section-level origin only explains section-level errors: a key left at its default was not "set in" it.
        origin = origins.get(err.key or "")
        if origin is None:
            raise
        raise ConfigError(f"{err} (set {origin})", key=err.key) from None


def config_from_dict(d: Mapping[str, Mapping[str, Any]]) -> Config:
    """Build a Config from a plain `{section: {key: value}}` dict (e.g. the one stored in a checkpoint).

    Strict: unknown sections or keys, wrong types and invalid values raise ConfigError. Missing sections and keys
    take their defaults. Values are coerced like YAML values (`'1e-4'` becomes 1e-4).
    """
    return _build(d, {})


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The plain `{section: {key: value}}` form of `cfg` (lists, not tuples), ready for JSON or YAML."""
    if not isinstance(cfg, Config):
        raise TypeError(f"config_to_dict expects a Config, got {type(cfg).__name__}")
    return {
        name: {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        for name, section in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write `cfg` as YAML to `path` atomically (temporary file + rename); `--config path` reloads it exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved mixmo_dist config; reload with --config " + path.name + "\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as for every other output (mkstemp would give 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_yaml(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections ({', '.join(_sections())}), got {type(data).__name__}"
        )
    return data


def _parse_value(text: str, tp: Any) -> Any:
    # Text fields keep the literal text: YAML would turn `--run.name=2024` into an int and
    # `--run.mixed_precision=no` into False. Everything else is parsed as YAML, so `[30,60]`, `null` and `1e-4` work.
    if _is_text_type(tp):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        # Not YAML: hand the raw text to the strict coercion, which reports it against the field's type.
        return text


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Split a command line into the config file and the `--section.key` overrides.

    Accepts `--config FILE`, `--config=FILE`, `--section.key=value` and `--section.key value`; a repeated key or
    `--config` keeps the last value. Section and key names are checked (ConfigError with a suggestion); values are
    parsed as YAML except for text fields, and are coerced and validated only when the Config is built.

    Any other word raises ConfigError, so a launcher with flags of its own removes them first (e.g. argparse's
    `parse_known_args`), and can drop a section from what it forwards to the job with
    `overrides.pop("slurm", None)` followed by `format_overrides(config_path, overrides)`.

    Args:
        argv: the words after the module name.

    Returns:
        (config_path or None, {section: {key: value}}) in command-line order.
    """
    if isinstance(argv, str) or not isinstance(argv, Sequence):
        raise TypeError(f"argv must be a list of strings, got {type(argv).__name__}")
    config_path: str | None = None
    overrides: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if not isinstance(word, str):
            raise TypeError(f"argv must be a list of strings, got {word!r} ({type(word).__name__}) at position {i}")
        name, has_value, text = word[2:].partition("=") if word.startswith("--") else ("", False, "")
        if not word.startswith("--") or (name != "config" and "." not in name):
            raise ConfigError(
                f"unexpected command-line argument {word!r}; expected --config FILE or --section.key=value "
                f"(sections: {', '.join(_sections())})"
            )
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"command-line argument {word} needs a value ({word}=VALUE or {word} VALUE)")
            text = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            if not text:
                raise ConfigError("command-line argument --config needs a file path")
            config_path = text
            continue
        section, _, key = name.partition(".")
        where = f" in command-line argument {word!r}"
        _check_section(section, where)
        tp = _check_key(section, key, where)
        overrides.setdefault(section, {})[key] = _parse_value(text, tp)
    return config_path, overrides


def format_overrides(config_path: str | None, overrides: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The inverse of `parse_overrides`: argv words that parse back to the same path and overrides."""
    argv = [] if config_path is None else ["--config", str(config_path)]
    for section, values in overrides.items():
        _check_section(section, "")
        for key, value in values.items():
            tp = _check_key(section, key, "")
            if _is_text_type(tp) and isinstance(value, str):
                text = value
            else:
                # A one-element flow list makes PyYAML quote exactly what would otherwise change type on reload.
                text = yaml.safe_dump([_plain(value)], default_flow_style=True, width=2**31).strip()[1:-1]
            argv.append(f"--{section}.{key}={text}")
    return argv


def load_config(argv: Sequence[str]) -> Config:
    """Resolve the run configuration: defaults < YAML file (`--config`) < command-line overrides.

    Args:
        argv: the words after the module name, e.g. `["--config", "configs/x.yaml", "--optim.lr=0.2"]`; without
            `--config` the defaults (the CPU demo) are the base.

    Raises:
        ConfigError: unknown section/key/argument, unreadable file, wrong type or invalid value; the message names
            the key and where it was set.
    """
    config_path, overrides = parse_overrides(argv)
    merged: dict[Any, dict[Any, Any]] = {}
    origins: dict[str, str] = {}
    if config_path is not None:
        for section, values in _read_yaml(config_path).items():
            merged[section] = dict(values) if isinstance(values, Mapping) else values
            origins[str(section)] = f"in {config_path}"
            if isinstance(values, Mapping):
                origins.update({f"{section}.{key}": f"in {config_path}" for key in values})
    for section, values in overrides.items():
        if merged.get(section) is None:
            merged[section] = {}
        if isinstance(merged[section], dict):  # a non-mapping section stays as is, so _build reports it
            merged[section].update(values)
        origins.update({f"{section}.{key}": "on the command line" for key in values})
    return _build(merged, origins)
