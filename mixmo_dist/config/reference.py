"""The key reference, generated from the config dataclasses: `--help` text and docs/CONFIG.md.

Every key's type and default come from its field; its meaning is the docstring under the field in schema.py (read
with `ast`, since Python keeps no attribute docstrings), joined into one line. Nothing here is written by hand per
key, so the help, docs/CONFIG.md and the code cannot disagree (tests/test_config.py compares the file with
`markdown()`).
"""

import ast
import dataclasses
import functools
import inspect
import re
import shutil
import textwrap
import typing
from typing import Any, Literal

import yaml

from mixmo_dist.config import schema
from mixmo_dist.config.loader import check_section
from mixmo_dist.config.schema import field_types, is_text_type, optional_inner, section_classes

__all__ = ["KeyDoc", "help_text", "key_docs", "markdown", "section_doc"]

MARKDOWN_COMMAND = "python -m mixmo_dist.config --markdown > docs/CONFIG.md"
"""The command that writes docs/CONFIG.md."""


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """What the reference says about one key."""

    name: str
    """The key's name within its section (`lr` of `--optim.lr`)."""
    type: Any
    """The field's annotation."""
    default: Any
    """The field's declared default (coerced, as the config holds it)."""
    doc: str
    """The field's docstring on one line."""


@functools.cache
def _field_docstrings() -> dict[str, dict[str, str]]:
    """`{class name: {field: docstring}}` for every class of schema.py: the string statement under each field."""
    tree = ast.parse(inspect.getsource(schema))
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs.setdefault(node.name, {})[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def key_docs(section: str) -> list[KeyDoc]:
    """The keys of `section` in declaration order; raises KeyError for an unknown section."""
    cls = section_classes()[section]
    defaults = cls()
    docs = _field_docstrings().get(cls.__name__, {})
    return [KeyDoc(name, tp, getattr(defaults, name), docs.get(name, "")) for name, tp in field_types(cls).items()]


def section_doc(section: str) -> str:
    """The first paragraph of the section class's docstring, on one line."""
    doc = inspect.getdoc(section_classes()[section]) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _type_name(tp: Any, markdown: bool) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner, markdown)} or null"
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return ", ".join(choices) if markdown else "{" + ",".join(choices) + "}"
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return f"list of {_type_name(item, markdown) if typing.get_origin(item) is Literal else item.__name__}"
    return tp.__name__


def _value_text(value: Any, tp: Any) -> str:
    """`value` as it is written on the command line (`--section.key=TEXT`) and in YAML."""
    if is_text_type(tp) and isinstance(value, str):
        return value
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump([value], default_flow_style=True, width=2**31).strip()[1:-1]


def _section_text(section: str, width: int) -> str:
    lines = [f"{section}: {section_doc(section)}"]
    for key in key_docs(section):
        lines.append(
            f"  --{section}.{key.name}  {_type_name(key.type, False)}  (default: {_value_text(key.default, key.type)})"
        )
        # No break after a hyphen: a reader (or a test) joining the lines with spaces gets the words back.
        lines += textwrap.wrap(
            key.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False
        )
    return "\n".join(lines)


def help_text(prog: str, section: str | None = None, width: int | None = None) -> str:
    """The trainer's `--help`: usage, how settings combine, then every key of every section with its type, default
    and doc; with `section`, only that section's keys.

    Args:
        prog: how the program is started, e.g. "python -m mixmo_dist.train".
        section: a section name, or None for all.
        width: text width; None = the terminal's, between 60 and 120.

    Raises:
        ConfigError: `section` is not a section (the message lists the valid ones).
    """
    if width is None:
        width = min(120, max(60, shutil.get_terminal_size((100, 24)).columns - 1))
    if section is not None:
        check_section(section, " for --help")
        return _section_text(section, width)
    names = list(section_classes())
    intro = (
        "Trains a MixMo network. On N processes: accelerate launch --multi_gpu --num_processes N -m mixmo_dist.train "
        "[words]. Settings are layered, later ones winning: the built-in defaults (the CPU demo), a YAML file of "
        "sections and keys (--config FILE, e.g. configs/demo.yaml or a run's config.yaml), then --section.key=VALUE "
        "or --section.key VALUE words, whose VALUE is read as YAML (null, true, [30, 60], 1e-4). An unknown key, a "
        "wrong type or an out-of-range value is an error naming the key. A value you set is never changed; a default "
        "that conflicts with it adapts, and the run logs what it chose. The same reference is in docs/CONFIG.md."
    )
    parts = [
        f"usage: {prog} [--config FILE] [--section.key=VALUE ...]\n"
        f"       {prog} [--config FILE] [--section.key=VALUE ...] --print-config\n"
        f"       {prog} -h|--help [SECTION]",
        textwrap.fill(intro, width),
        "options:\n"
        "  --config FILE         YAML file of settings (a mapping of sections to mappings of keys)\n"
        "  --print-config        print the resolved config as YAML and exit (--config FILE reloads it)\n"
        "  -h, --help [SECTION]  print this help, or only SECTION's keys, and exit",
        textwrap.fill(f"sections: {', '.join(names)}", width, subsequent_indent="  "),
    ]
    parts += [_section_text(name, width) for name in names]
    return "\n\n".join(parts)


_MARKDOWN_INTRO = """\
Every key of the trainer, `python -m mixmo_dist.train` (also under `accelerate launch -m mixmo_dist.train`), with
its type, its default (the CPU demo) and its meaning. From the command line, `python -m mixmo_dist.train --help`
prints the same, `--help SECTION` one section, and `--print-config` the resolved config as YAML.

## How a config is resolved

- **Layers**, later ones winning: the built-in defaults, a YAML file (`--config FILE`: a mapping of sections to
  mappings of keys, e.g. `configs/demo.yaml` or a run's `config.yaml`), then `--section.key=VALUE` or
  `--section.key VALUE` on the command line. A repeated key or `--config` keeps the last value.
- **Values** on the command line are read as YAML (`null`, `true`, `[30, 60]`, `1e-4`), except for text keys,
  which keep the literal text (`--run.name=2024` is the string `2024`). `1e-4` in a YAML file is a float too.
- **Strict**: an unknown section or key, a wrong type or an out-of-range value is one `error:` line naming the key
  and where it was set (exit status 2).
- **Rules between keys** (warmup shorter than the run, Nesterov with momentum, batch a multiple of
  `mixmo.batch_repetitions`, ...) hold the values you set, in the file or on the command line: a conflict between
  two of them is an error naming the key. A *default* that conflicts with a value you set adapts instead, as its
  meaning below says ("left at its default, ..."), e.g. `--schedule.epochs=1` makes the default warmup 0.25 epochs.
  The trainer logs each adapted default; `--print-config` lists them as comments.
- **Stored configs**: every run writes its resolved config to `<output_dir>/config.yaml` and into each checkpoint,
  with every key spelled out (adapted defaults included), so they reload as written.
- **Derived values** (per-rank rows, unique images per step, scaled LR, steps per epoch, total and stop step,
  evaluation interval) are computed by the builders, written to `run.json` under `plan` and logged at start, never
  written back into the config.
"""


def _cell(text: str) -> str:
    # A `|` would end the cell; `<output_dir>` would be read as an HTML tag and vanish (`x < y` stays as it is).
    return re.sub(r"<(?=[A-Za-z_/])", "&lt;", text.replace("|", "\\|"))


def markdown() -> str:
    """docs/CONFIG.md: how settings are resolved, then one table per section (key, type, default, meaning)."""
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from the field docstrings in mixmo_dist/config/schema.py by",
        f"     `{MARKDOWN_COMMAND}`.",
        "     Edit the docstrings, then regenerate; tests/test_config.py fails while the two differ. -->",
        "",
        _MARKDOWN_INTRO,
    ]
    for name in section_classes():
        lines += [f"## `{name}`", "", section_doc(name), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key in key_docs(name):
            default = _value_text(key.default, key.type)
            lines.append(f"| `{key.name}` | {_cell(_type_name(key.type, True))} | `{default}` | {_cell(key.doc)} |")
        lines.append("")
    return "\n".join(lines)
