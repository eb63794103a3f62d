"""Tests of the trainer's command line: `--help [SECTION]`, `-h`, `--print-config`, also under `accelerate launch`.

The expected keys, types, defaults and docs are read here from the dataclasses and the source of schema.py, not
from the generator under test.
"""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from conftest import ACCELERATE_SCRIPT, run_train, train_cli, train_env

from mixmo_dist.config import Config, load_config
from mixmo_dist.config import schema as schema_module
from mixmo_dist.config.cli import info_text

PROG = "python -m mixmo_dist.train"
SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _docs() -> dict[str, dict[str, str]]:
    """`{class: {field: one-line docstring}}` from schema.py's source."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(Path(schema_module.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            for stmt, nxt in zip(node.body, node.body[1:]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                    docs.setdefault(node.name, {})[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return _type(next(a for a in args if a is not type(None))) + " or null"
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(args) + "}"
    if typing.get_origin(tp) is tuple:
        return f"list of {_type(args[0])}"  # a tuple of choices (log.trackers) lists them
    return tp.__name__


def _default(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return "[]" if value == () else str(value)


def expected_keys(section: str) -> list[tuple[str, str, str]]:
    """(the key's first help line, its doc) for every key of `section`."""
    section_cls = type(getattr(Config(), section))
    hints = typing.get_type_hints(section_cls)
    docs = _docs()[section_cls.__name__]
    rows = []
    for f in dataclasses.fields(section_cls):
        default = getattr(section_cls(), f.name)
        rows.append((f"  --{section}.{f.name}  {_type(hints[f.name])}  (default: {_default(default)})", docs[f.name]))
    return rows


def assert_section_listed(text: str, section: str) -> None:
    lines = text.splitlines()
    assert sum(line.startswith(f"{section}: ") for line in lines) == 1, f"no single header of section {section}"
    for head, doc in expected_keys(section):
        assert head in lines, f"missing help line {head!r}"
        # The doc follows its key's line, wrapped: compare without line breaks.
        after = " ".join(" ".join(lines[lines.index(head) + 1 :]).split())
        assert after.startswith(doc), f"{head.split()[0]}: doc {doc!r} does not follow"


def test_help_lists_every_key_of_every_section_with_type_default_and_doc():
    res = train_cli("--help")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.startswith(f"usage: {PROG} [--config FILE] [--section.key=VALUE ...]\n")
    for section in SECTIONS:
        assert_section_listed(res.stdout, section)
    assert "--print-config" in res.stdout and "docs/CONFIG.md" in res.stdout
    # The slurm section belongs to the submitit launcher, and the help says so.
    (slurm_header,) = [line for line in res.stdout.splitlines() if line.startswith("slurm: ")]
    assert "python -m mixmo_dist.submit" in slurm_header and "the trainer and `sbatch` ignore" in slurm_header


def test_short_flag_and_flags_among_other_words_print_the_same_help(tmp_path):
    full = train_cli("--help").stdout
    assert train_cli("-h").stdout == full
    # Help wins over everything else on the line, which is not even read (the file does not exist).
    res = train_cli("--config", str(tmp_path / "missing.yaml"), "--optim.lr=abc", "--help", "--data.hflip=no")
    assert res.returncode == 0 and res.stdout == full


@pytest.mark.parametrize("words", [["--help", "optim"], ["--help=optim"], ["-h", "optim"]])
def test_help_section_shows_only_that_section(words):
    res = train_cli(*words)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert_section_listed(res.stdout, "optim")
    others = [s for s in SECTIONS if s != "optim"]
    assert not [line for line in res.stdout.splitlines() if line.split(".")[0].strip() in {f"--{s}" for s in others}]
    assert not any(line.startswith(f"{s}: ") for s in others for line in res.stdout.splitlines())
    assert "usage:" not in res.stdout


def test_help_unknown_section_is_one_error_line():
    res = train_cli("--help", "optm")
    assert res.returncode == 2 and res.stdout == ""
    valid = ", ".join(SECTIONS)
    expected = f"error: unknown config section 'optm' for --help; valid sections: {valid}; did you mean optim?\n"
    assert res.stderr == expected


def test_help_under_a_two_process_accelerate_launch_prints_once(tmp_path):
    out = tmp_path / "run"
    # torchrun starts 2 ranks: rank 0 prints, both exit 0 before any process group, Accelerator or run directory.
    # The `accelerate` console script itself here (the rest of the suite runs its launch module, the same code).
    rc, log = run_train(["--help", f"--run.output_dir={out}"], nproc=2, timeout=300, launcher=ACCELERATE_SCRIPT)
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log and "FAILED" not in log and "ChildFailedError" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if line.lower().startswith(("error", "warning"))], log[-3000:]
    assert log.count(f"usage: {PROG}") == 1
    for section in SECTIONS:
        assert sum(line.startswith(f"{section}: ") for line in log.splitlines()) == 1, section
    assert log.count("  --optim.lr  float") == 1
    assert log.count(train_cli("--help").stdout) == 1
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_global_rank_zero_prints_and_every_rank_exits_alike(tmp_path, rank):
    # torchrun exports RANK to each rank. Under a real launch the agent stops the other ranks as soon as one exits
    # non-zero, so whether rank 1 would have printed too is a race there: the rank logic is checked here instead.
    env = train_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2")
    out = tmp_path / "run"
    bad = train_cli("--optim.lrr=0.1", f"--run.output_dir={out}", env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    if rank == "0":
        assert bad.stderr.startswith("error: unknown config key optim.lrr in command-line argument '--optim.lrr=0.1'")
        assert bad.stderr.endswith("; did you mean optim.lr?\n") and bad.stderr.count("\n") == 1
    else:
        assert bad.stderr == ""
    for words in (["--help"], ["--help", "log"], ["--print-config"]):
        res = train_cli(*words, f"--run.output_dir={out}", env=env)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert (res.stdout != "") == (rank == "0")
    assert train_cli("--help", "nope", env=env).stderr.startswith("error:") == (rank == "0")
    assert not out.exists()


def test_print_config_round_trips_through_config(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1e-3\nrun:\n  name: '2024'\n", encoding="utf-8")
    out = tmp_path / "run"
    words = ["--config", str(recipe), "--schedule.epochs=1", "--run.mixed_precision=no", f"--run.output_dir={out}"]
    res = train_cli(*words, "--print-config")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    expected = load_config(words)
    assert yaml.safe_load(res.stdout)["optim"]["lr"] == 1e-3
    # The adapted default is listed as a comment, the values reload exactly.
    assert f"# adapted default: {expected.adaptations[0]}\n" in res.stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(res.stdout, encoding="utf-8")
    assert load_config(["--config", str(printed)]) == expected
    assert (expected.run.name, expected.run.mixed_precision, expected.schedule.warmup_epochs) == ("2024", "no", 0.25)
    assert not out.exists()  # printing a config creates nothing


def test_print_config_refuses_what_a_run_refuses():
    res = train_cli("--optim.lr=abc", "--print-config")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: config key optim.lr: expected a float") and res.stderr.count("\n") == 1


def test_values_that_look_like_flags_stay_values():
    # `--run.name -h` names the run "-h", as it always did; only a word in a flag's place is a flag.
    text = info_text(["--run.name", "-h", "--print-config"], prog=PROG)
    assert yaml.safe_load(text)["run"]["name"] == "-h"
    assert info_text(["--run.name", "x"], prog=PROG) is None
