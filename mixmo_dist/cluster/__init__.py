"""Launching on a cluster: a SLURM node's launcher command (slurm.py) and training as a submitit job."""
