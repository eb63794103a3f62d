"""mixmo_dist: a distributed trainer for MixMo networks (multi-input multi-output subnetworks)."""

__version__ = "0.1.0"
