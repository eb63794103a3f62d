"""Training: member inputs, the MixMo loss, optimizer and LR schedule, the run plan, reporting, and the Trainer
(the only code that knows the order of a step)."""
