"""Tests of mixmo_dist.config: layering, strict coercion, error messages, round trips and field documentation."""

import ast
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mixmo_dist import config as config_module
from mixmo_dist.config import (
    Config,
    ConfigError,
    DataConfig,
    MixMoConfig,
    OptimConfig,
    ScheduleConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    format_overrides,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"
SECTIONS = ("run", "data", "model", "mixmo", "optim", "schedule", "checkpoint", "log", "eval", "fault", "slurm")


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def test_defaults_are_the_cpu_demo():
    cfg = load_config([])
    assert cfg == Config()
    assert tuple(f.name for f in dataclasses.fields(cfg)) == SECTIONS
    assert (cfg.model.arch, cfg.mixmo.num_members, cfg.mixmo.mixing) == ("resnet18", 2, "cut")
    assert (cfg.data.root, cfg.data.image_size, cfg.data.batch_size) == ("data/demo", 32, 64)
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    # Coercion runs on defaults too: an int default of a float field is stored as a float.
    assert type(cfg.schedule.epochs) is float and cfg.schedule.epochs == 6.0
    assert cfg.schedule.milestones == () and cfg.checkpoint.every_n_minutes == 30.0


def test_demo_yaml_spells_out_every_default():
    raw = yaml.safe_load(DEMO_YAML.read_text(encoding="utf-8"))
    defaults = config_to_dict(Config())
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in defaults.items()}
    # No --config means the demo: the file only writes the defaults out.
    assert load_config(["--config", str(DEMO_YAML)]) == Config()


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        optim:
          lr: 0.2
          momentum: 0.8
        data:
          image_size: 32
        """,
    )
    cfg = load_config(["--config", path, "--optim.lr=0.3", "--data.hflip", "false"])
    assert cfg.optim.lr == 0.3  # command line beats YAML
    assert cfg.optim.momentum == 0.8 and cfg.data.image_size == 32  # YAML beats defaults
    assert cfg.data.hflip is False
    assert cfg.optim.weight_decay == pytest.approx(5e-4) and cfg.model.arch == "resnet18"  # untouched defaults
    assert load_config([f"--config={path}"]).optim.lr == 0.2


def test_last_repeated_key_and_config_win(tmp_path):
    first = write_yaml(tmp_path, "run: {seed: 1}\n", "a.yaml")
    second = write_yaml(tmp_path, "run: {seed: 2}\n", "b.yaml")
    cfg = load_config(["--optim.lr=0.2", "--config", first, "--optim.lr", "0.4", f"--config={second}"])
    assert cfg.optim.lr == 0.4
    assert cfg.run.seed == 2


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 1e-4\n  weight_decay: 5e-5\n")
    # The premise: PyYAML reads `1e-4` as a string.
    assert yaml.safe_load(Path(path).read_text())["optim"]["lr"] == "1e-4"
    cfg = load_config(["--config", path])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.weight_decay == pytest.approx(5e-5)


def test_command_line_values_are_yaml_then_coerced():
    cfg = load_config(
        [
            "--schedule.kind=step",
            "--schedule.milestones=[3, 5.5]",
            "--schedule.max_steps",
            "1e3",
            "--optim.lr=1e-4",
            "--optim.clip_grad_norm=null",
            "--optim.ema_decay=0.999",
            "--model.num_classes=None",
            "--log.tensorboard=true",
            "--data.hflip=NO",
            "--run.mixed_precision=no",
            "--run.name=2024-01-01",
            "--slurm.partition=gpu",
        ]
    )
    assert cfg.schedule.milestones == (3.0, 5.5) and cfg.schedule.kind == "step"
    assert cfg.schedule.max_steps == 1000 and type(cfg.schedule.max_steps) is int
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.clip_grad_norm is None and cfg.optim.ema_decay == 0.999
    assert cfg.model.num_classes is None
    assert cfg.log.tensorboard is True and cfg.data.hflip is False
    # Text fields keep the literal text: YAML would have made these False and a date.
    assert cfg.run.mixed_precision == "no" and cfg.run.name == "2024-01-01"
    assert cfg.slurm.partition == "gpu"
    # A scalar for a list field is a one-element list.
    assert load_config(["--schedule.milestones=4"]).schedule.milestones == (4.0,)


@pytest.mark.parametrize(
    ("section", "key", "raw", "expected"),
    [
        ("data", "image_size", 32.0, 32),
        ("data", "image_size", "48", 48),
        ("optim", "lr", 1, 1.0),
        ("optim", "lr", " 2.5e-1 ", 0.25),
        ("optim", "nesterov", "Yes", True),
        ("optim", "nesterov", "0", False),
        ("optim", "nesterov", 1, True),
        ("optim", "ema_decay", "none", None),
        ("optim", "ema_decay", "0.5", 0.5),
        ("schedule", "milestones", [2, "3.5"], (2.0, 3.5)),
        ("run", "mixed_precision", False, "no"),  # YAML 1.1 reads an unquoted `no` as False
        ("slurm", "mem_gb", None, None),
    ],
)
def test_coercion_accepts(section, key, raw, expected):
    value = getattr(getattr(config_from_dict({section: {key: raw}}), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("argv", "key", "fragments"),
    [
        (["--optim.lr=abc"], "optim.lr", ["config key optim.lr: expected a float, got 'abc' (str)", "command line"]),
        (["--run.seed=1.5"], "run.seed", ["expected an int, got 1.5 (float)"]),
        (["--data.batch_size=true"], "data.batch_size", ["expected an int, got True (bool)"]),
        (["--data.hflip=maybe"], "data.hflip", ["expected a bool", "'maybe'"]),
        (["--optim.lr=.inf"], "optim.lr", ["expected a finite float"]),
        (["--model.num_classes=ten"], "model.num_classes", ["expected an int or null"]),
        (["--schedule.milestones=[2, x]"], "schedule.milestones", ["schedule.milestones[1]: expected a float"]),
        (["--schedule.milestones={a: 1}"], "schedule.milestones", ["expected a list of floats"]),
        (["--optm.lr=1"], "optm", ["unknown config section 'optm'", "valid sections: run, data", "did you mean optim"]),
        (["--optim.lrr=1"], "optim.lrr", ["unknown config key optim.lrr", "valid keys of optim: lr,", "optim.lr?"]),
        (
            ["--run.mixed_precision=fp8"],
            "run.mixed_precision",
            ["invalid value 'fp8'", "valid choices: auto, no, bf16, fp16"],
        ),
        (
            ["--data.backend=dali"],
            "data.backend",
            ["valid choices: auto, dali-gpu, dali-cpu, torch, synthetic"],
        ),
        (
            ["--mixmo.num_members=1", "--mixmo.mixing=cut"],
            "mixmo.mixing",
            ["needs mixmo.num_members >= 2", "requires mixmo.mixing=none", "mixmo.num_members set on the command line"],
        ),
        (["--data.image_size=4"], "data.image_size", ["must be >= 8, got 4"]),
        (["--data.val_resize_ratio=1.5"], "data.val_resize_ratio", ["must be in (0, 1]"]),
        (["--optim.momentum=0", "--optim.nesterov=yes"], "optim.nesterov", ["Nesterov needs optim.momentum > 0"]),
        (["--optim.ema_decay=1"], "optim.ema_decay", ["in (0, 1) or null"]),
        (
            ["--schedule.warmup_epochs=6"],
            "schedule.warmup_epochs",
            ["in [0, schedule.epochs=6.0)", "(set on the command line; schedule.epochs is at its default)"],
        ),
        (
            ["--schedule.warmup_epochs=1", "--schedule.epochs=1"],
            "schedule.warmup_epochs",
            ["in [0, schedule.epochs=1.0), got 1.0", "schedule.epochs set on the command line"],
        ),
        (["--schedule.warmup_epochs=-1"], "schedule.warmup_epochs", ["must be >= 0"]),
        (["--schedule.milestones=[5, 3]"], "schedule.milestones", ["strictly increasing"]),
        (["--schedule.milestones=[9]"], "schedule.milestones", ["in (0, schedule.epochs=6.0)"]),
        (
            ["--data.batch_size=63"],
            "data.batch_size",
            ["not divisible by mixmo.batch_repetitions=2", "mixmo.batch_repetitions is at its default"],
        ),
        (["--data.batch_size=64", "--mixmo.batch_repetitions=3"], "data.batch_size", ["batch_repetitions=3"]),
        (["--data.global_batch_size=99"], "data.global_batch_size", ["not divisible by mixmo.batch_repetitions=2"]),
        (["--model.head_init_std=0.01"], "model.head_init_std", ["only applies with model.init=reference"]),
        (["--model.init=reference", "--model.head_init_std=0"], "model.head_init_std", ["must be > 0 or null"]),
        (["--model.init=he"], "model.init", ["valid choices: timm, reference"]),
        (["--data.copy_augmentation=each"], "data.copy_augmentation", ["valid choices: shared, per_copy"]),
        (["--slurm.signal_delay_s=3600"], "slurm.signal_delay_s", ["60 * slurm.timeout_min=3600"]),
        (["--log.tracker_timeout_s=-1"], "log.tracker_timeout_s", ["must be >= 0 (0 = do not wait), got -1"]),
        (["--slurm.signal_delay_s=120", "--slurm.timeout_min=2"], "slurm.signal_delay_s", ["timeout_min=120)"]),
    ],
)
def test_invalid_command_line_names_the_key(argv, key, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert info.value.key == key
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_yaml_errors_name_the_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  weight_decai: 1e-4\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key optim\.weight_decai;.*did you mean optim\.weight_decay\? \(set in .*cfg\.yaml\)",
    ):
        load_config(["--config", path])
    path = write_yaml(tmp_path, "schedule:\n  kind: linear\n")
    with pytest.raises(
        ConfigError,
        match=rf"schedule\.kind: invalid value 'linear'; valid choices: cosine, step \(set in {re.escape(path)}\)",
    ):
        load_config(["--config", path])
    path = write_yaml(tmp_path, "mixmo:\n  num_members: 1\n  mixing: linear\n")
    with pytest.raises(ConfigError, match=r"vanilla baseline.*\(set in .*; mixmo.num_members set in .*cfg\.yaml\)"):
        load_config(["--config", path])
    # The command line can fix what the file got wrong.
    assert load_config(["--config", path, "--mixmo.mixing=none"]).mixmo.num_members == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- run\n- data\n", "must hold a mapping of sections"),
        ("optim: [1, 2]\n", "config section optim must be a mapping of keys"),
        ("optim: {lr: [\n", "is not valid YAML"),
        ("modle:\n  arch: resnet50\n", "did you mean model?"),
    ],
)
def test_bad_yaml_files(tmp_path, text, fragment):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(["--config", write_yaml(tmp_path, "")]) == Config()
    assert load_config(["--config", write_yaml(tmp_path, "eval:\n")]) == Config()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train.yaml"], "unexpected command-line argument 'train.yaml'"),
        (["--cluster", "slurm"], "unexpected command-line argument '--cluster'"),
        (["-v"], "unexpected command-line argument '-v'"),
        (["--optim.lr"], "--optim.lr needs a value"),
        (["--optim.lr", "--data.hflip=false"], "--optim.lr needs a value"),
        (["--config="], "--config needs a file path"),
        (["--config", "/nonexistent/x.yaml"], "cannot read config file /nonexistent/x.yaml"),
    ],
)
def test_bad_arguments(argv, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert fragment in str(info.value)


def test_argv_must_be_a_list():
    with pytest.raises(TypeError, match="list of strings"):
        parse_overrides("--optim.lr=0.1")


def test_sections_are_frozen_hashable_and_validated_on_construction():
    cfg = load_config(["--schedule.kind=step", "--schedule.milestones=[2,4]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = OptimConfig()
    assert hash(cfg) == hash(load_config(["--schedule.kind=step", "--schedule.milestones=[2,4]"]))
    with pytest.raises(TypeError):
        OptimConfig(0.1)  # keyword-only
    with pytest.raises(ConfigError, match=r"data\.image_size: must be >= 8"):
        DataConfig(image_size=4)
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a float"):
        dataclasses.replace(cfg.optim, lr="fast")
    with pytest.raises(ConfigError, match="config section mixmo: expected a MixMoConfig, got dict"):
        Config(mixmo={"num_members": 2})
    assert ScheduleConfig(milestones=[1, 2]).milestones == (1.0, 2.0)
    assert MixMoConfig(num_members=1, mixing="none").num_members == 1


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = load_config(
        ["--optim.lr=1e-3", "--schedule.kind=step", "--schedule.milestones=[2,5]", "--slurm.partition=gpu"]
        + ["--run.mixed_precision=no", "--model.init_from=ckpt/vanilla.safetensors", "--optim.ema_decay=0.99"]
    )
    assert cfg != Config()
    d = config_to_dict(cfg)
    assert d["schedule"]["milestones"] == [2.0, 5.0] and d["optim"]["lr"] == 1e-3
    # The stored form survives JSON (checkpoints) and reloads strictly.
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(["--config", str(path)]) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    with pytest.raises(ConfigError, match=r"unknown config key optim\.momentun"):
        config_from_dict({**d, "optim": {**d["optim"], "momentun": 0.9}})
    with pytest.raises(TypeError):
        config_to_dict(d)


def test_launcher_can_strip_its_own_words_and_forward_the_rest():
    argv = ["--config", "configs/demo.yaml", "--slurm.nodes", "2", "--optim.lr=1e-4", "--run.name=2024"]
    argv += ["--schedule.milestones=[2, 4]", "--model.num_classes=null", "--run.mixed_precision=no"]
    path, overrides = parse_overrides(argv)
    assert path == "configs/demo.yaml"
    assert overrides["slurm"] == {"nodes": 2} and overrides["optim"] == {"lr": "1e-4"}
    assert overrides["run"] == {"name": "2024", "mixed_precision": "no"}
    overrides.pop("slurm")
    forwarded = format_overrides(path, overrides)
    assert not any(word.startswith("--slurm.") for word in forwarded)
    assert parse_overrides(forwarded) == (path, overrides)
    cfg = load_config(forwarded)
    assert (cfg.slurm.nodes, cfg.optim.lr, cfg.run.name, cfg.model.num_classes) == (1, 1e-4, "2024", None)


def test_every_field_has_a_docstring():
    tree = ast.parse(Path(config_module.schema.__file__).read_text(encoding="utf-8"))
    documented: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in zip(node.body, node.body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert is_doc and isinstance(nxt.value.value, str), f"{node.name}.{stmt.target.id} has no docstring"
                assert nxt.value.value.strip(), f"{node.name}.{stmt.target.id} has an empty docstring"
                documented.setdefault(node.name, set()).add(stmt.target.id)
    for section_cls in [Config] + [type(getattr(Config(), name)) for name in SECTIONS]:
        fields = {f.name for f in dataclasses.fields(section_cls)}
        assert fields and fields <= documented.get(section_cls.__name__, set()), section_cls.__name__


def test_entry_point_pattern_prints_one_line_error():
    script = textwrap.dedent(
        """
        import sys
        from mixmo_dist.config import ConfigError, load_config
        try:
            cfg = load_config(sys.argv[1:])
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(cfg.optim.lr)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", script]
    bad = subprocess.run(run + ["--optim.lr=abc"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config key optim.lr: expected a float, got 'abc' (str)")
    good = subprocess.run(run + ["--optim.lr", "0.05"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert good.returncode == 0 and good.stdout.strip() == "0.05"


# --------------------------------------------------------------------------------------------------------------
# Defaults adapt to the values set; values set are held to every rule; stored configs reload as written.
# --------------------------------------------------------------------------------------------------------------

# Every rule between keys that has an adaptive side: (the words that set one key, the default that adapts, its value).
ADAPTIVE = [
    (["--schedule.epochs=1"], "schedule.warmup_epochs", 0.25),
    (["--schedule.epochs=0.5"], "schedule.warmup_epochs", 0.125),
    (["--mixmo.num_members=1"], "mixmo.mixing", "none"),
    (["--optim.momentum=0"], "optim.nesterov", False),
    (["--mixmo.batch_repetitions=3"], "data.batch_size", 63),
    (["--mixmo.batch_repetitions=128"], "data.batch_size", 128),
    (["--slurm.timeout_min=1"], "slurm.signal_delay_s", 30),
    (["--slurm.timeout_min=2"], "slurm.signal_delay_s", 60),
]


def _value(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize(("argv", "key", "adapted"), ADAPTIVE)
def test_a_default_adapts_to_the_values_set_and_is_recorded(tmp_path, argv, key, adapted):
    cfg = load_config(argv)
    value = _value(cfg, key)
    assert value == adapted and type(value) is type(adapted)
    (change,) = cfg.adaptations
    assert (change.key, change.value, change.default) == (key, adapted, _value(Config(), key))
    line = str(change)
    assert line.startswith(f"{key}={adapted!r} instead of its default ") and "\n" not in line
    # The key the default had to fit is named in the reason.
    assert argv[0][2:].split("=")[0] in line
    # The same value set in a YAML file adapts the same way.
    section, _, name = argv[0][2:].partition("=")[0].partition(".")
    path = write_yaml(tmp_path, yaml.safe_dump({section: {name: yaml.safe_load(argv[0].split("=")[1])}}))
    assert load_config(["--config", path]) == cfg and load_config(["--config", path]).adaptations == cfg.adaptations


def test_warmup_adapts_only_where_the_default_conflicts():
    # Commands that were valid before keep exactly their meaning: a warmup that fits stays 1 epoch.
    assert load_config(["--schedule.epochs=1.5"]).schedule.warmup_epochs == 1.0
    assert load_config(["--schedule.epochs=1.5"]).adaptations == ()
    assert load_config([]).adaptations == () and Config().adaptations == ()
    # A warmup set by the user is never adapted, only checked.
    assert load_config(["--schedule.epochs=1", "--schedule.warmup_epochs=0.5"]).schedule.warmup_epochs == 0.5
    assert load_config(["--schedule.epochs=1", "--schedule.warmup_epochs=0"]).adaptations == ()
    # Defaults never invent a run length: a warmup or milestones longer than the default epochs are refused.
    with pytest.raises(ConfigError, match=r"schedule\.milestones: .*schedule\.epochs is at its default"):
        load_config(["--schedule.kind=step", "--schedule.milestones=[30, 60]"])


def test_values_set_in_a_file_are_held_to_the_rules_too():
    # configs/demo.yaml spells out warmup_epochs: 1.0, so a 1-epoch run over it must set the warmup as well.
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(DEMO_YAML), "--schedule.epochs=1"])
    assert info.value.key == "schedule.warmup_epochs"
    assert f"(set in {DEMO_YAML}; schedule.epochs set on the command line)" in str(info.value)
    cfg = load_config(["--config", str(DEMO_YAML), "--schedule.epochs=1", "--schedule.warmup_epochs=0.1"])
    assert cfg.schedule.warmup_epochs == 0.1 and cfg.adaptations == ()


def test_python_callers_get_the_same_rules():
    assert ScheduleConfig(epochs=1).warmup_epochs == 0.25
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs: must be in \[0, schedule\.epochs=1\.0\)"):
        ScheduleConfig(epochs=1, warmup_epochs=1)
    # replace() passes every field: the old warmup counts as set.
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs"):
        dataclasses.replace(ScheduleConfig(), epochs=1)
    # A section shared by two configs is never changed in place by a rule that spans sections.
    data = DataConfig()
    cfg = Config(data=data, mixmo=MixMoConfig(batch_repetitions=3))
    assert cfg.data.batch_size == 63 and data.batch_size == 64 and Config(data=data).data is data
    assert [c.key for c in cfg.adaptations] == ["data.batch_size"]


@pytest.mark.parametrize(("argv", "key", "adapted"), ADAPTIVE)
def test_stored_configs_reload_as_written(tmp_path, argv, key, adapted):
    cfg = load_config(argv)
    assert cfg.adaptations
    # Equality and hashing ignore how a value came to be; copies keep the record.
    assert pickle.loads(pickle.dumps(cfg)).adaptations == cfg.adaptations
    # Checkpoints store config_to_dict (every key, the adapted one included) as JSON.
    stored = json.loads(json.dumps(config_to_dict(cfg)))
    assert _value(config_from_dict(stored), key) == adapted
    assert config_from_dict(stored) == cfg and hash(config_from_dict(stored)) == hash(cfg)
    assert config_from_dict(stored).adaptations == ()  # nothing left at a default
    # Run directories store dump_config's YAML; --config reloads it, with the record as a comment.
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, path)
    text = path.read_text(encoding="utf-8")
    assert f"# adapted default: {cfg.adaptations[0]}\n" in text
    assert load_config(["--config", str(path)]) == cfg
    assert load_config(["--config", str(path)]).adaptations == ()
    # evaluate/export merge single-key overrides over the stored dict: an unrelated key keeps the rest valid.
    assert config_from_dict({**stored, "data": {**stored["data"], "root": "elsewhere"}}).data.root == "elsewhere"


def test_config_md_is_the_generated_reference():
    from mixmo_dist.config.reference import MARKDOWN_COMMAND, markdown

    text = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert text == markdown(), f"docs/CONFIG.md differs from the config dataclasses: run `{MARKDOWN_COMMAND}`"
    # The generator lists every key of every section, with its docstring.
    docs = {}
    for node in ast.walk(ast.parse(Path(config_module.schema.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            for stmt, nxt in zip(node.body, node.body[1:]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                    docs[node.name, stmt.target.id] = " ".join(nxt.value.value.split())
    for section in SECTIONS:
        section_cls = type(getattr(Config(), section))
        body = text.split(f"\n## `{section}`\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in body.splitlines() if line.startswith("| `")]
        assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(section_cls)], section
        for row, f in zip(rows, dataclasses.fields(section_cls)):
            plain = row.replace("&lt;", "<").replace("\\|", "|")  # Markdown escapes of the generator
            assert plain.endswith(f" | {docs[section_cls.__name__, f.name]} |"), row
    # The entry point that writes the file prints the same text.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.config", "--markdown"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0 and res.stdout == text, res.stderr
