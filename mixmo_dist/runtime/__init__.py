"""Process-level services every stage may use: the Accelerator, collectives, signals, seeds, logging and files.

Nothing here knows about MixMo; nothing here imports another part of the package except `config`-free helpers.
"""
