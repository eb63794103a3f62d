"""The trainer's informational flags: `-h/--help [SECTION]` and `--print-config` print something and train nothing."""

import os
import sys
from collections.abc import Sequence

from mixmo_dist.config.loader import config_yaml, load_config
from mixmo_dist.config.reference import help_text
from mixmo_dist.config.schema import ConfigError

__all__ = ["answer_without_training", "info_text", "is_global_rank_zero"]

HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG = "--print-config"


def info_text(argv: Sequence[str], *, prog: str) -> str | None:
    """The text that `argv` asks to print instead of training, or None when `argv` describes a run.

    `-h`, `--help`, `--help SECTION` or `--help=SECTION` anywhere in `argv` (the other words are not read): the key
    reference of `reference.help_text`, or one section of it. Otherwise `--print-config` among the run's words: the
    config those words resolve to, as YAML with its adapted defaults as comments; `--config` on that text rebuilds an
    equal config.

    Args:
        argv: the words after the module name.
        prog: how the program is started, for the usage lines (e.g. "python -m mixmo_dist.train").

    Raises:
        ConfigError: an unknown help section, or (with --print-config) anything `load_config` refuses.
    """
    if isinstance(argv, str) or not all(isinstance(word, str) for word in argv):
        raise TypeError(f"argv must be a list of strings, got {argv!r}")
    print_config = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        flag, _, section = word.partition("=")
        if flag in HELP_FLAGS:
            if not section and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                section = argv[i + 1]
            return help_text(prog, section or None)
        if word == PRINT_CONFIG:
            print_config = True
        else:
            rest.append(word)
            # The value of `--section.key VALUE` is never a flag, even one that looks like it (`--run.name -h`).
            if word.startswith("--") and "=" not in word and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                rest.append(argv[i + 1])
                i += 1
        i += 1
    if not print_config:
        return None
    cfg = load_config(rest)
    return config_yaml(cfg, f"Resolved mixmo_dist config ({prog} --print-config); reload with --config FILE")


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not part of a launched world at all)."""
    # torchrun (under accelerate launch) exports RANK to every rank; a plain `python -m` run has none.
    return os.environ.get("RANK", "0") == "0"


def answer_without_training(argv: Sequence[str], *, prog: str) -> int | None:
    """`--help`, `--print-config` or words the config refuses: print on global rank 0 only and return the exit
    status (0, or 2 after one `error:` line); None when `argv` describes a valid run.

    Every rank reads the same words and files, so every rank gets the same answer and exits here, before torch is
    imported or any process group or Accelerator exists: under `accelerate launch` the text or the error line
    appears once.
    """
    try:
        text = info_text(argv, prog=prog)
        if text is None:
            load_config(argv)  # the run loads it again; this only refuses bad words early, on every rank alike
            return None
    except ConfigError as err:
        if is_global_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        return 2
    if is_global_rank_zero():
        try:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `--help | head`: the reader has what it wanted; point stdout at devnull so the exit flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
