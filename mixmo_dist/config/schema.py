"""The config schema: one frozen, keyword-only dataclass per section, their coercion and their validation.

Each field is coerced to its annotation and checked when a section is built. A rule between two keys (warmup vs
run length, Nesterov vs momentum, ...) holds the values a caller passed; a *default* that breaks it adapts to what
was passed instead of failing, and the change is recorded (`Config.adaptations`). The loader (loader.py) passes
exactly the keys set in YAML or on the command line, so those are the "passed" values; a stored config passes every
key and is therefore held to every rule as written.
"""

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

__all__ = [
    "Adaptation",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FaultConfig",
    "LogConfig",
    "MixMoConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "SlurmConfig",
]


class ConfigError(ValueError):
    """A user error in the configuration (file, command line or stored dict); the message is one line.

    Attributes:
        key: the `section.key` the error is about, or None when it is about no single key (e.g. a bad file).
        related: the other `section.key`s of a broken rule between keys (the loader says where each was set).
    """

    def __init__(self, message: str, *, key: str | None = None, related: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.related = related


def _fail(key: str, detail: str, related: tuple[str, ...] = ()) -> typing.NoReturn:
    raise ConfigError(f"config key {key}: {detail}", key=key, related=related)


@dataclass(frozen=True)
class Adaptation:
    """A default that was changed to fit values set by the user (see the module docstring)."""

    key: str
    """`section.key` of the adapted default."""
    default: Any
    """The field's declared default."""
    value: Any
    """The value the config holds instead."""
    reason: str
    """Why, naming the keys it had to fit."""

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} instead of its default {self.default!r}: {self.reason}"


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


def optional_inner(tp: Any) -> Any | None:
    """The X of `X | None`, or None when `tp` is not optional."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise AssertionError(f"unsupported union annotation {tp!r}")  # only `X | None` is used in this module
    return None


def is_text_type(tp: Any) -> bool:
    """True for str, Literal[str, ...] and their `| None` forms: fields whose command-line text is kept raw."""
    inner = optional_inner(tp)
    tp = inner if inner is not None else tp
    return tp is str or typing.get_origin(tp) is Literal


def _describe(tp: Any) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return f"a list of {_describe(item) if typing.get_origin(item) is Literal else item.__name__ + 's'}"
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
    inner = optional_inner(tp)
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
def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------------------------------


class _Section:
    """Base of every section: coerces each field to its annotation, then runs the section's own checks.

    Besides its fields, an instance holds `_given` (the names of the keywords its caller passed) and `_adapted`
    (the Adaptations its rules made); neither takes part in equality, hashing or the stored form.
    """

    _section: ClassVar[str]
    """The section's name in YAML and on the command line (`optim` for `--optim.lr`)."""

    def __init_subclass__(cls, *, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Section":
        # __new__ sees the caller's keywords, the generated __init__ cannot tell a passed value from a default: the
        # rules need that difference (a passed value is held to them, a default adapts). Copies and unpickling call
        # __new__ without keywords, then restore both attributes from the original's __dict__.
        self = super().__new__(cls)
        object.__setattr__(self, "_given", frozenset(kwargs))
        object.__setattr__(self, "_adapted", ())
        return self

    def __post_init__(self) -> None:
        for name, tp in field_types(type(self)).items():
            # The dataclass is frozen; __post_init__ is the one place allowed to store the coerced value.
            object.__setattr__(self, name, _coerce(getattr(self, name), tp, f"{self._section}.{name}"))
        self._validate()

    def _validate(self) -> None:
        """Range checks of single keys (`_check`), then rules between keys (`_rule`); raise ConfigError."""

    def _check(self, name: str, ok: bool, requirement: str) -> None:
        if not ok:
            _fail(f"{self._section}.{name}", f"must be {requirement}, got {getattr(self, name)!r}")

    def _rule(
        self,
        name: str,
        ok: bool,
        detail: str,
        *,
        related: tuple[str, ...],
        adapt: Callable[[], Any] | None = None,
        why: str = "",
    ) -> None:
        """A rule between key `name` of this section and the `related` keys (`section.key`); `ok` says it holds.

        When it does not: if `name` was not passed (its default broke the rule) and `adapt` is given, `name` takes
        `adapt()` and the change is recorded with `why` as its reason; otherwise ConfigError naming `name`, with
        `detail` as the message.
        """
        if ok:
            return
        if adapt is None or name in self._given:
            _fail(f"{self._section}.{name}", detail, related)
        default = getattr(self, name)
        object.__setattr__(self, name, adapt())
        change = Adaptation(f"{self._section}.{name}", default, getattr(self, name), why)
        object.__setattr__(self, "_adapted", (*self._adapted, change))


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Section, section="run"):
    """Identity and reproducibility of a run."""

    name: str = "demo"
    """Run name, used in logs, as the TensorBoard run name and as the default SLURM job name."""
    output_dir: str = "runs/demo"
    """Directory for the resolved config, metrics, TensorBoard logs and checkpoints/ (created if missing)."""
    seed: int = 0
    """Base seed; every rank derives its own generators from it and its global rank."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast dtype: auto follows the launcher's --mixed_precision; an explicit value wins over the launcher. fp16
    needs CUDA."""
    tf32: Literal["auto", "on", "off"] = "auto"
    """TF32 for float32 matmuls and convolutions on Ampere and later GPUs (10-bit mantissa, faster). auto: on for
    bf16/fp16 runs, off for fp32 runs, so that fp32 means fp32 as in the authors' runs (torch itself enables TF32 for
    convolutions by default). No effect without CUDA."""
    num_threads: int = 0
    """Intra-op CPU threads of each rank (torch.set_num_threads); 0 = OMP_NUM_THREADS where the user set it (a value
    the launcher set by itself does not count), else the CPUs of the rank's affinity divided by the ranks on its
    node. DataLoader workers keep one thread each. On a machine shared with other jobs, 1 avoids OpenMP threads
    waiting at every barrier for a core another process holds (10x slower steps were measured)."""

    def _validate(self) -> None:
        self._check("name", bool(self.name.strip()), "a non-empty string")
        self._check("output_dir", bool(self.output_dir.strip()), "a non-empty path")
        # Per-rank seeds are seed + rank and numpy-style seeders take 32 bits.
        self._check("seed", 0 <= self.seed < 2**31, "in [0, 2**31)")
        self._check("num_threads", self.num_threads >= 0, ">= 0 (0 = auto)")


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section, section="data"):
    """Where the images come from, how they are decoded, augmented and batched."""

    root: str = "data/demo"
    """Dataset root holding train/ and val/ class folders (ignored by the synthetic backend); the default is the
    demo set that `make demo` generates."""
    dataset: Literal["imagefolder", "cifar10", "cifar100", "tinyimagenet"] = "imagefolder"
    """Dataset layout and normalisation statistics to use (each layout is described in README.md, Data)."""
    backend: Literal["auto", "dali-gpu", "dali-cpu", "torch", "synthetic"] = "auto"
    """Loader. auto: dali-gpu with CUDA and DALI, dali-cpu with DALI but no CUDA, torch without DALI. synthetic:
    random tensors (benchmarks and smoke tests)."""
    image_size: int = 32
    """Side of the square training and validation crops, in pixels."""
    val_resize_ratio: float = 0.875
    """Validation resizes the shorter side to image_size / val_resize_ratio, then center-crops image_size."""
    batch_size: int = 64
    """Rows per rank per step, counting batch repetitions (rows / mixmo.batch_repetitions unique images); must be a
    multiple of mixmo.batch_repetitions (left at its default, it is rounded down to one)."""
    global_batch_size: int | None = None
    """Rows per step over all ranks; when set it replaces batch_size (per-rank rows = global / world size)."""
    val_batch_size: int | None = None
    """Validation images per rank per step; null = the per-rank rows."""
    num_workers: int = 2
    """Decoding worker processes per rank for the torch backend."""
    worker_timeout_s: float = 600.0
    """Torch backend: longest wait for one batch from the workers before the run stops with an error naming this
    key (a stuck worker, e.g. on a hung file system, would otherwise hang every rank); 0 waits forever."""
    index_dir: str | None = None
    """Where the index of an image-folder dataset (its file list, built by one scan and reused by every rank and
    start) is kept: null = `<data.root>/.mixmo_index/` when data.root is writable, else no index is kept and every
    rank scans at every start (with a warning naming this key); a path = a folder every node sees, holding one
    sub-folder per dataset. See docs/DESIGN.md, Data."""
    rescan: bool = False
    """Scan the image folders again even when the dataset index looks current (its check compares each folder's
    mtime, which misses a change made within the same timestamp tick on a file system with coarse timestamps)."""
    train_crop: Literal["random_resized", "pad_random"] = "random_resized"
    """Training crop: RandomResizedCrop (ImageNet) or pad-4 random crop (CIFAR / Tiny ImageNet recipes)."""
    min_crop_scale: float = 0.25
    """Smallest area fraction kept by the random resized crop."""
    hflip: bool = True
    """Random horizontal flip in training."""
    copy_augmentation: Literal["shared", "per_copy"] = "per_copy"
    """How the b x M copies of an image in a MixMo step (mixmo.batch_repetitions rows, in each of mixmo.num_members
    members) are augmented. per_copy (the default since issue 23): each copy gets its own crop and flip, as the MixMo
    authors' loader (it reads every copy separately); the image is still decoded once. shared: one augmented view
    per image, copied to all its rows and members (MIMO's ImageNet code; cheaper to augment, but the members then
    see the same view of an image)."""
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
        self._check("index_dir", self.index_dir is None or bool(self.index_dir.strip()), "a non-empty path or null")
        self._check("min_crop_scale", 0 < self.min_crop_scale <= 1, "in (0, 1]")
        self._check("dali_threads", self.dali_threads >= 1, ">= 1")
        self._check("dali_prefetch", self.dali_prefetch >= 1, ">= 1")
        self._check("synthetic_size", self.synthetic_size >= 1, ">= 1")
        self._check("num_synthetic_classes", self.num_synthetic_classes >= 2, ">= 2")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section, section="model"):
    """The timm backbone that is converted into a MixMo network."""

    arch: str = "resnet18"
    """timm name of a convolutional backbone whose first layer is a plain conv or timm's weight-standardised StdConv2d
    and whose classifier is a Linear layer or a 1x1 conv: the ResNet families, ResNet-v2 and BiT (all 20 timm
    resnetv2 models convert) and ConvNeXt (all 28 timm convnext models convert; its stem conv has a bias). Trained
    and folded in the tests: resnet18/34/50/101/152, resnet50d, resnet26t, wide_resnet50_2, resnext50_32x4d,
    seresnet50, convnext_atto, resnetv2_18, resnetv2_50x1_bit, plus the paper's wide_resnet28_10 and
    preactresnet18_3 (registered by mixmo_dist.model). A BiT with M > 1 folds exactly into a plain first conv, which
    timm cannot rebuild from a file: export refuses it (docs/OUTPUTS.md). Refused with a message: other stem conv
    types (NFNet's ScaledStdConv2d, the tf_ models' Conv2dSame), vision transformers."""
    num_classes: int | None = None
    """Number of classes K; null = number of class folders (when set it must match the data)."""
    channels_last: bool = True
    """Use the channels_last memory format for activations and weights."""
    compile: bool = False
    """Wrap the training forward (MixMoNet.forward_train) in torch.compile."""
    init_from: str | None = None
    """Vanilla weights to start the backbone from (an exported file or a 1-member run, see init_from in
    docs/OUTPUTS.md); null = the random initialisation of model.init."""
    init: Literal["timm", "reference"] = "timm"
    """Random initialisation. timm: the backbone's own (He normal fan_out convs, torch's default Linear heads).
    reference: the MixMo authors' (every conv, encoders included, truncated normal at +-2 std of std
    sqrt(2/fan_in)/0.8796, so a realised std of sqrt(2/fan_in); heads the same unless model.head_init_std; biases 0,
    norm weights 1 and biases 0)."""
    head_init_std: float | None = None
    """With model.init=reference: draw the heads from N(0, head_init_std) instead of the conv rule (the authors'
    Tiny ImageNet network uses 0.01, their CIFAR WRN the conv rule); null = the conv rule."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics over all ranks (torch SyncBatchNorm), so the BN batch is the global batch,
    not the per-rank one. Needs a CUDA device; checkpoints keep plain BatchNorm keys (they load on CPU)."""

    def _validate(self) -> None:
        self._check("arch", bool(self.arch.strip()), "a non-empty timm model name")
        self._check("num_classes", self.num_classes is None or self.num_classes >= 2, ">= 2 or null")
        self._check("init_from", self.init_from is None or bool(self.init_from.strip()), "a non-empty path or null")
        self._check("head_init_std", self.head_init_std is None or self.head_init_std > 0, "> 0 or null")
        self._rule(
            "head_init_std",
            self.head_init_std is None or self.init == "reference",
            "only applies with model.init=reference (timm initialises the heads its own way)",
            related=("model.init",),
        )


@dataclass(frozen=True, kw_only=True)
class MixMoConfig(_Section, section="mixmo"):
    """The MixMo method: members, mixing block, loss reweighting and batch construction."""

    num_members: int = 2
    """Number of subnetworks M (encoder + head pairs); 1 with mixing none is the vanilla baseline."""
    mixing: Literal["cut", "linear", "none"] = "cut"
    """Mixing block in training: cut (Cut-MixMo: rectangles with probability p, else linear), linear
    (Linear-MixMo), none (fixed 1/M). num_members=1 needs none (left at its default, it becomes none)."""
    alpha: float = 2.0
    """Dirichlet concentration of the mixing ratios kappa; 0 = fixed 1/M (MIMO)."""
    cut_prob: float = 0.5
    """p0: probability that a batch uses rectangles instead of linear mixing; decays linearly to 0 over the last
    1/12 of training."""
    weight_root: float = 3.0
    """r of the loss weights w_m = M kappa_m^(1/r) / sum_j kappa_j^(1/r); 1 gives w = M kappa."""
    batch_repetitions: int = 2
    """b: each unique image appears b times in a batch, in a different random order per member."""
    input_repetition: float = 0.0
    """rho: the first int(rho * rows) rows of the repeated batch are the same image for every member, the others
    are shuffled per member (the MixMo authors' definition; MIMO's ImageNet recipe uses 0.6)."""
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
        self._rule(
            "mixing",
            self.num_members >= 2 or self.mixing == "none",
            f"{self.mixing!r} mixing needs mixmo.num_members >= 2, got num_members=1; "
            "the vanilla baseline (num_members=1) requires mixmo.mixing=none",
            related=("mixmo.num_members",),
            adapt=lambda: "none",
            why="mixmo.num_members=1 (the vanilla baseline) has nothing to mix",
        )


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section, section="optim"):
    """SGD, weight decay, loss options and step-level safety nets."""

    lr: float = 0.8
    """Peak LR for lr_reference_batch unique images per step; scaled linearly to the real number of unique images."""
    lr_reference_batch: int = 256
    """Unique images per step (over all ranks and accumulation steps) that lr is given for."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum; needs momentum > 0 (left at its default with momentum 0, it becomes false)."""
    weight_decay: float = 5e-4
    """SGD weight decay coefficient (added to the gradient; an L2 loss c * sum(theta^2) equals weight decay 2c)."""
    wd_exclude_norm_bias: bool = True
    """Exclude normalisation layers and biases from weight decay (chosen by module type)."""
    label_smoothing: float = 0.0
    """Label smoothing of each member's cross-entropy (0 in the MixMo recipes)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value; null = no clipping."""
    ema_decay: float | None = None
    """Decay of an exponential moving average of the weights; when set, validation uses the EMA weights. null = no
    EMA."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss (those steps are skipped on every rank)."""

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
        self._rule(
            "nesterov",
            not (self.nesterov and self.momentum == 0),
            "Nesterov needs optim.momentum > 0; set optim.nesterov=false or a momentum",
            related=("optim.momentum",),
            adapt=lambda: False,
            why="Nesterov needs optim.momentum > 0, and optim.momentum is 0",
        )


_WARMUP_CAP = 0.25
"""Fraction of schedule.epochs a default warmup_epochs is cut to when it does not fit the run."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(_Section, section="schedule"):
    """Training length and learning-rate schedule (per step, warmup then cosine or step decay)."""

    epochs: float = 6.0
    """Training length in epochs (an epoch = every unique image seen batch_repetitions times per member)."""
    warmup_epochs: float = 1.0
    """Linear warmup from 0 to the peak LR over this many epochs, per step; must be < epochs (left at its default
    with epochs <= 1, it becomes epochs / 4)."""
    kind: Literal["cosine", "step"] = "cosine"
    """Decay after warmup: cosine to 0 at the end, or multiply by gamma at each milestone."""
    milestones: tuple[float, ...] = ()
    """Epochs after which kind=step multiplies the LR by gamma; strictly increasing, each < epochs."""
    gamma: float = 0.1
    """Factor applied at each milestone of kind=step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even if the epochs are not done (the schedule still spans epochs)."""

    def _validate(self) -> None:
        self._check("epochs", self.epochs > 0, "> 0")
        self._check("warmup_epochs", self.warmup_epochs >= 0, ">= 0")
        self._check("gamma", self.gamma > 0, "> 0")
        self._check("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or null")
        ms = self.milestones
        self._check("milestones", all(m > 0 for m in ms), "> 0 each")
        self._check("milestones", all(a < b for a, b in zip(ms, ms[1:])), "strictly increasing")
        # A run length the user did not choose is never invented to fit a warmup or milestones: those are refused.
        self._rule(
            "warmup_epochs",
            self.warmup_epochs < self.epochs,
            f"must be in [0, schedule.epochs={self.epochs}), got {self.warmup_epochs!r}",
            related=("schedule.epochs",),
            adapt=lambda: self.epochs * _WARMUP_CAP,
            why=f"the default does not fit in schedule.epochs={self.epochs}; capped to {_WARMUP_CAP:g} x epochs",
        )
        self._rule(
            "milestones",
            all(m < self.epochs for m in ms),
            f"must be in (0, schedule.epochs={self.epochs}), got {ms!r}",
            related=("schedule.epochs",),
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section, section="checkpoint"):
    """When checkpoints are written, how many are kept, and how a run resumes."""

    every_n_steps: int | None = None
    """Save every this many optimizer steps; null = not by step count."""
    every_n_minutes: float | None = 30.0
    """Save when this many minutes have passed since the last save (agreed by all ranks); null = not by time."""
    keep_last: int = 3
    """Number of complete checkpoints kept; older ones are deleted once a new one is complete."""
    resume: str = "auto"
    """auto = resume from the newest complete checkpoint in output_dir, if any (refused when every checkpoint there
    is corrupt); never = start fresh at step 0 (earlier metrics are kept as metrics.jsonl.superseded-<time>);
    otherwise a step_<N> directory to resume from."""

    def _validate(self) -> None:
        self._check("every_n_steps", self.every_n_steps is None or self.every_n_steps >= 1, ">= 1 or null")
        self._check("every_n_minutes", self.every_n_minutes is None or self.every_n_minutes > 0, "> 0 or null")
        self._check("keep_last", self.keep_last >= 1, ">= 1")
        self._check("resume", bool(self.resume.strip()), "auto, never or a checkpoint directory")


@dataclass(frozen=True, kw_only=True)
class LogConfig(_Section, section="log"):
    """Training-time logging."""

    every_n_steps: int = 10
    """Log loss, LR and throughput every this many optimizer steps, and at the last step."""
    tensorboard: bool = False
    """Also write TensorBoard event files, to <output_dir>/<project>/: the same as listing tensorboard in trackers.
    Needs the tensorboard package (in the venv and the Docker image); refused with an error where it is missing."""
    trackers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ()
    """Experiment trackers fed through Accelerate, e.g. [mlflow, wandb]: the resolved config once, then every
    metrics.jsonl row at its step. A resumed run continues the same tracker run (ids in <output_dir>/trackers.json).
    mlflow and wandb need the 'trackers' extra; a missing package is refused before training starts."""
    project: str | None = None
    """The trackers' project: the MLflow experiment, the W&B project, TensorBoard's subdirectory; null = run.name."""
    mlflow_tracking_uri: str | None = None
    """Where MLflow logs (a server URL such as http://127.0.0.1:5000, or sqlite:///path.db); null = the
    MLFLOW_TRACKING_URI environment variable, else sqlite:///<output_dir>/mlflow.db."""
    wandb_mode: Literal["online", "offline"] | None = None
    """W&B mode: online sends to the W&B server, offline writes <output_dir>/wandb/ only (upload later with
    `wandb sync`); null = the WANDB_MODE environment variable, else online."""
    tracker_timeout_s: float = 60.0
    """Seconds rank 0 waits at the end of a run (completed, preempted, stopped on an error) for the trackers to take
    the rows still queued and close their runs. Training never waits for a tracker (each sends from its own thread);
    one that has not finished by then is left with one warning naming it, its URI and the steps it lacks, which a
    resume sends. 0 = do not wait."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console progress: a bar on a terminal, plain log lines otherwise (auto), or forced."""

    def _validate(self) -> None:
        self._check("every_n_steps", self.every_n_steps >= 1, ">= 1")
        self._check("tracker_timeout_s", self.tracker_timeout_s >= 0, ">= 0 (0 = do not wait)")
        self._check("trackers", len(set(self.trackers)) == len(self.trackers), "a list without repeats")
        self._check("project", self.project is None or bool(self.project.strip()), "null or a non-empty string")

    @property
    def all_trackers(self) -> tuple[str, ...]:
        """`trackers`, with tensorboard added where `tensorboard` is true."""
        extra = ("tensorboard",) if self.tensorboard and "tensorboard" not in self.trackers else ()
        return (*self.trackers, *extra)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(_Section, section="eval"):
    """Validation during training."""

    every_n_epochs: float = 1.0
    """Evaluate on the validation split every this many epochs (fractions allowed; rounded to whole steps)."""
    at_end: bool = True
    """Evaluate once more after the last step."""

    def _validate(self) -> None:
        self._check("every_n_epochs", self.every_n_epochs > 0, "> 0")


@dataclass(frozen=True, kw_only=True)
class FaultConfig(_Section, section="fault"):
    """How a run that stops answering ends: collective timeouts, the hang watchdog, requeues after a lost peer."""

    startup_timeout_s: float = 1800.0
    """Collective timeout (seconds) from the start of each (re)start until its first step has completed: covers the
    dataset scan, the resume (rank 0 verifies checkpoints while the others wait), compilation and the first step.
    Raise it where one rank's start-up can take longer (a cold network file system, a huge dataset index)."""
    collective_timeout_s: float = 300.0
    """Collective timeout (seconds) after the first step: the longest any rank waits for its peers, in a step, a
    validation or a checkpoint save (the other ranks wait while rank 0 writes). A peer silent for longer is lost:
    every rank writes its stacks, prints one line and exits 75, and the SLURM job is requeued. Raise it when a save
    of your model takes minutes (see docs/SLURM.md)."""
    watchdog_s: float = 900.0
    """End a rank on which no step, validation batch or checkpoint file completes for this many seconds (a hang
    outside collectives: a stalled read, a deadlocked loader), with the same stacks, line and exit; 0 = off. Must be
    longer than collective_timeout_s, so that a wait inside a collective ends on the timeout, which names it."""
    max_requeues: int = 3
    """Requeues of a SLURM job after a lost peer or a hang, in a row without a newer checkpoint; one more fault
    ends the job (it would fail the same way again)."""

    def _validate(self) -> None:
        self._check("startup_timeout_s", self.startup_timeout_s > 0, "> 0")
        self._check("collective_timeout_s", self.collective_timeout_s > 0, "> 0")
        self._check("max_requeues", self.max_requeues >= 0, ">= 0")
        self._check("watchdog_s", self.watchdog_s >= 0, ">= 0 (0 = off)")
        self._rule(
            "watchdog_s",
            self.watchdog_s == 0 or self.watchdog_s > self.collective_timeout_s,
            f"must be 0 (off) or longer than fault.collective_timeout_s={self.collective_timeout_s:g}, got "
            f"{self.watchdog_s:g}: a wait inside a collective must end on the timeout, which names the operation",
            related=("fault.collective_timeout_s",),
            adapt=lambda: 3 * self.collective_timeout_s,
            why=f"the default is not longer than fault.collective_timeout_s={self.collective_timeout_s:g}; 3x it",
        )


@dataclass(frozen=True, kw_only=True)
class SlurmConfig(_Section, section="slurm"):
    """Job resources, read by `python -m mixmo_dist.submit` (submitit); the trainer and `sbatch` ignore them."""

    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 = a CPU job with no GPU request)."""
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
    """Seconds before the time limit at which the job is signalled to checkpoint and requeue; must be < 60 *
    timeout_min (left at its default with timeout_min <= 2, it becomes half the time limit)."""
    max_requeues: int = 20
    """submitit's limit on requeues after timeouts (preemptions are not counted)."""
    array_parallelism: int = 64
    """A sweep's job array (`submit --sweep`): at most this many of its points run at once."""
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
        self._check("array_parallelism", self.array_parallelism >= 1, ">= 1")
        self._check("signal_delay_s", self.signal_delay_s >= 0, ">= 0")
        for name in ("partition", "account", "qos", "constraint", "job_name"):
            value = getattr(self, name)
            self._check(name, value is None or bool(value.strip()), "a non-empty string or null")
        # A signal at or before the job's start would leave no time to train.
        limit_s = 60 * self.timeout_min
        self._rule(
            "signal_delay_s",
            self.signal_delay_s < limit_s,
            f"must be in [0, 60 * slurm.timeout_min={limit_s}), got {self.signal_delay_s!r}",
            related=("slurm.timeout_min",),
            adapt=lambda: limit_s // 2,
            why=f"the default does not fit in the {limit_s} s time limit (slurm.timeout_min); set to half of it",
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run configuration: one field per section; defaults reproduce the CPU demo.

    `adaptations` lists the defaults that were changed to fit values the caller set (see the module docstring).
    """

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
    fault: FaultConfig = field(default_factory=FaultConfig)
    """Collective timeouts, the hang watchdog, requeues after a fault."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM resources (read by python -m mixmo_dist.submit only)."""

    def __post_init__(self) -> None:
        for name, section_cls in field_types(Config).items():
            value = getattr(self, name)
            if not isinstance(value, section_cls):
                raise ConfigError(
                    f"config section {name}: expected a {section_cls.__name__}, got {type(value).__name__}", key=name
                )
        # Rules that span sections. A section may be shared by several Configs: adapt a copy, never the original.
        # The world size is unknown here, so per-rank checks of global_batch_size belong to the data builder.
        reps = self.mixmo.batch_repetitions
        data = copy.copy(self.data)
        data._rule(
            "batch_size",
            data.global_batch_size is not None or data.batch_size % reps == 0,
            f"{data.batch_size} rows per rank is not divisible by mixmo.batch_repetitions={reps} "
            "(each unique image fills batch_repetitions rows)",
            related=("mixmo.batch_repetitions",),
            adapt=lambda: max(reps, data.batch_size // reps * reps),
            why=f"the default is not a multiple of mixmo.batch_repetitions={reps}; rounded down to one",
        )
        data._rule(
            "global_batch_size",
            data.global_batch_size is None or data.global_batch_size % reps == 0,
            f"{data.global_batch_size} rows is not divisible by mixmo.batch_repetitions={reps}",
            related=("mixmo.batch_repetitions",),
        )
        if data.batch_size != self.data.batch_size:
            object.__setattr__(self, "data", data)
        changes = tuple(change for name in field_types(Config) for change in getattr(self, name)._adapted)
        object.__setattr__(self, "_adaptations", changes)

    @property
    def adaptations(self) -> tuple[Adaptation, ...]:
        """The defaults changed to fit the values set (in section order); empty for a config stored in full."""
        return self._adaptations


def section_classes() -> dict[str, type]:
    """`{section name: section class}` in the order of Config's fields."""
    return field_types(Config)
