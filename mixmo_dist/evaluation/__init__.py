"""Evaluation: paper-grade metrics (exact under DDP), temperature scaling, the evaluation of checkpoints, plots."""
