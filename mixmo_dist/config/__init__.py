"""Typed run configuration: the sections (schema.py), loading from dicts, YAML and argv (loader.py), the key
reference for `--help` and docs/CONFIG.md (reference.py), and the trainer's informational flags (cli.py).

The only code that reads YAML or argv; `from mixmo_dist.config import ...` is its public interface.
"""

# The public names are the `__all__` of the two modules (each lists its own once).
from mixmo_dist.config import loader, schema
from mixmo_dist.config.loader import *  # noqa: F403
from mixmo_dist.config.schema import *  # noqa: F403

__all__ = [*schema.__all__, *loader.__all__]
