"""Typed run configuration (see schema.py); `from mixmo_dist.config import ...` is the public interface."""

from mixmo_dist.config.schema import *  # noqa: F403
from mixmo_dist.config.schema import __all__  # noqa: F401
