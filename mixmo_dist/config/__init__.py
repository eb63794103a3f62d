"""Typed run configuration: the sections (schema.py), loading from dicts, YAML and argv (loader.py), the key
reference for `--help` and docs/CONFIG.md (reference.py), and the trainer's informational flags (cli.py).

The only code that reads YAML or argv; `from mixmo_dist.config import ...` is its public interface.
"""

from mixmo_dist.config.loader import (
    config_from_dict,
    config_to_dict,
    config_yaml,
    dump_config,
    format_overrides,
    load_config,
    parse_overrides,
)
from mixmo_dist.config.schema import (
    Adaptation,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    MixMoConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SlurmConfig,
)

__all__ = [
    "Adaptation",
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
    "config_yaml",
    "dump_config",
    "format_overrides",
    "load_config",
    "parse_overrides",
]
