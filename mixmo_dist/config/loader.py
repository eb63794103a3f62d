"""Loading and storing configs: plain dicts, YAML files and the command line (the only code reading YAML or argv).

A config is built from three layers, later ones winning: the dataclass defaults (the CPU demo), an optional YAML
file (`--config FILE`, a mapping of sections to mappings of keys) and command-line overrides
(`--section.key=value` or `--section.key value`). Every layer goes through the same strict path: unknown sections or
keys, type mismatches and out-of-range values raise `ConfigError`, whose one-line message names the key, where it
was set (and the valid choices or keys). Entry points catch `ConfigError`, print `error: <message>` to stderr and
exit with status 2.

Only the keys set in the YAML file or on the command line are passed to the sections, so a default that breaks a
rule between keys adapts to them (see schema.py) and `Config.adaptations` says so.
"""

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mixmo_dist.config.schema import Config, ConfigError, field_types, is_text_type, section_classes
from mixmo_dist.runtime.files import naming_the_file, write_text_atomic

__all__ = [
    "config_from_dict",
    "config_to_dict",
    "config_yaml",
    "dump_config",
    "format_overrides",
    "load_config",
    "parse_overrides",
]


def _suggest(word: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_section(section: Any, where: str) -> type:
    """The class of `section`, or ConfigError listing the valid sections and the closest one (`where` says which
    word of the input it came from, e.g. " for --help")."""
    sections = section_classes()
    if not isinstance(section, str) or section not in sections:
        raise ConfigError(
            f"unknown config section {section!r}{where}; valid sections: {', '.join(sections)}"
            + _suggest(str(section), list(sections)),
            key=str(section),
        )
    return sections[section]


def _check_key(section: str, key: Any, where: str) -> Any:
    """The annotation of `section.key`, or ConfigError listing the section's keys and the closest one."""
    types_by_key = field_types(section_classes()[section])
    if not isinstance(key, str) or key not in types_by_key:
        raise ConfigError(
            f"unknown config key {section}.{key}{where}; valid keys of {section}: {', '.join(types_by_key)}"
            + _suggest(str(key), list(types_by_key), f"{section}."),
            key=f"{section}.{key}",
        )
    return types_by_key[key]


def _build(d: Any, origins: Mapping[str, str]) -> Config:
    """The Config of `{section: {key: value}}` dict `d`; each section is passed exactly the keys `d` holds.

    Args:
        d: the keys that were set; every other key takes its default (adapted to the keys set where a rule needs).
        origins: where each `section.key` (and `section`) was set, e.g. "on the command line", for error messages.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of sections to mappings of keys, got {type(d).__name__}")
    sections = {}
    try:
        for name, values in d.items():
            section_cls = check_section(name, "")
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
        where = _where(err, d, origins)
        if not where:
            raise
        raise ConfigError(f"{err} ({where})", key=err.key, related=err.related) from None


def _where(err: ConfigError, d: Mapping[Any, Any], origins: Mapping[str, str]) -> str:
    """Where the culprit of `err` and the other keys of its rule were set, e.g. "set in a.yaml; schedule.epochs is
    at its default"; empty when nothing is known."""
    # A section-level origin only explains section-level errors: a key left at its default was not "set in" it.
    notes = [f"set {origins[err.key]}"] if err.key in origins else []
    for key in err.related:
        section, _, name = key.partition(".")
        values = d.get(section)
        if not (isinstance(values, Mapping) and name in values):
            notes.append(f"{key} is at its default")
        elif key in origins:
            notes.append(f"{key} set {origins[key]}")
    return "; ".join(notes)


def config_from_dict(d: Mapping[str, Mapping[str, Any]]) -> Config:
    """Build a Config from a plain `{section: {key: value}}` dict (e.g. the one stored in a checkpoint).

    Strict: unknown sections or keys, wrong types and invalid values raise ConfigError. Missing sections and keys
    take their defaults (adapted, like `load_config`'s, to the keys `d` holds). Values are coerced like YAML values
    (`'1e-4'` becomes 1e-4). A stored config holds every key, so it is held to every rule exactly as written.
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


def config_yaml(cfg: Config, header: str) -> str:
    """`cfg` as YAML text that `--config` reloads to an equal Config, after `# header` and one comment line per
    adapted default (`cfg.adaptations`)."""
    lines = [f"# {header}"] + [f"# adapted default: {change}" for change in cfg.adaptations]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write `cfg` as YAML to `path` atomically (temporary file + rename); `--config path` reloads it exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_the_file(path):
        write_text_atomic(path, config_yaml(cfg, f"Resolved mixmo_dist config; reload with --config {path.name}"))


def _read_yaml(path: str) -> Any:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # a ValueError, not an OSError: it used to escape as a traceback
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections ({', '.join(section_classes())}), "
            f"got {type(data).__name__}"
        )
    return data


def _parse_value(text: str, tp: Any) -> Any:
    # Text fields keep the literal text: YAML would turn `--run.name=2024` into an int and
    # `--run.mixed_precision=no` into False. Everything else is parsed as YAML, so `[30,60]`, `null` and `1e-4` work.
    if is_text_type(tp):
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
                f"(sections: {', '.join(section_classes())})"
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
        check_section(section, where)
        tp = _check_key(section, key, where)
        overrides.setdefault(section, {})[key] = _parse_value(text, tp)
    return config_path, overrides


def format_overrides(config_path: str | None, overrides: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The inverse of `parse_overrides`: argv words that parse back to the same path and overrides."""
    argv = [] if config_path is None else ["--config", str(config_path)]
    for section, values in overrides.items():
        check_section(section, "")
        for key, value in values.items():
            tp = _check_key(section, key, "")
            if is_text_type(tp) and isinstance(value, str):
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

    Returns:
        The Config. Values set in the file or on the command line are held to every rule between keys; a default
        that breaks one adapts to them instead (e.g. `--schedule.epochs=1` caps the default warmup to 0.25 epochs).
        `cfg.adaptations` lists those changes (`Adaptation`s, whose `str()` is a log line); the config layer prints
        nothing, so the entry point logs them: `for change in cfg.adaptations: log.info("config: %s", change)`.
        `dump_config`/`config_to_dict` store the adapted values, which reload unchanged and with no adaptations.

    Raises:
        ConfigError: unknown section/key/argument, unreadable file, wrong type or invalid value; the message names
            the key and where it was set (and, for a rule between keys, where the other keys come from).
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
