"""cxr_ray.config_flags: argparse flags from a dataclass's fields and field docstrings."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cxr_ray.config_flags import add_dataclass_flags, dataclass_kwargs, field_docs


@dataclass
class Demo:
    """A config with every kind of field the flags support."""

    epochs: int = 10
    """Epochs to train in total."""
    lr: float = 0.01
    """Learning rate; see :func:`cxr_ray.optim.schedules.make_policy`
    and   :class:`TrainConfig`."""
    name: str = "run"
    """Run name, written to ``runs/NAME``."""
    batch_size: int | None = None
    """Global batch size. None: from the preset."""
    augment: bool = True
    """Augment training images."""
    pretrained: str | bool = "auto"
    """``auto``, ``true`` or ``false``."""
    ref: int | str = 0
    """Epoch number or a tag."""
    scale: float | str = 1.0
    """Scale, or ``auto``."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra resources, e.g. ``{"gpu_node": 0.01}``."""
    tags: list[str] = field(default_factory=lambda: ["a"])
    """Tags (:mod:`cxr_ray.models`, :data:`~cxr_ray.train.SCORE_METRICS`)."""
    policy: Literal["constant", "triangular"] = "constant"
    """lr policy (:py:data:`cxr_ray.optim.schedules.POLICIES`)."""
    run_dir: str = ""
    """Output directory; keep 50% of it."""
    undocumented: int = 3


def make(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    add_dataclass_flags(parser, Demo, **kw)
    return parser


def parse(argv: list[str], **kw) -> dict:
    return vars(make(**kw).parse_args(argv))


def exit_code(argv: list[str], **kw) -> int:
    with pytest.raises(SystemExit) as e:
        make(**kw).parse_args(argv)
    return e.value.code


def helps(**kw) -> dict[str, str]:
    parser = make(**kw)
    return {a.dest: a.help for a in parser._actions if a.dest != "help"}


def test_field_docs_flattens_and_strips_roles():
    docs = field_docs(Demo)
    assert docs["epochs"] == "Epochs to train in total."
    assert docs["lr"] == "Learning rate; see make_policy and TrainConfig."
    assert docs["name"] == "Run name, written to runs/NAME."
    assert docs["pretrained"] == "auto, true or false."
    assert docs["resources"] == 'Extra resources, e.g. {"gpu_node": 0.01}.'
    assert docs["tags"] == "Tags (cxr_ray.models, SCORE_METRICS)."
    assert docs["policy"] == "lr policy (POLICIES)."
    assert "undocumented" not in docs


@pytest.mark.parametrize("dest, text", [
    ("epochs", "Epochs to train in total. (default: 10)"),
    ("batch_size", "Global batch size. None: from the preset. (default: None)"),
    ("augment", "Augment training images. (default: True)"),
    ("pretrained", "auto, true or false. (default: auto)"),
    ("resources", 'Extra resources, e.g. {"gpu_node": 0.01}. (default: {})'),
    ("tags", "Tags (cxr_ray.models, SCORE_METRICS). (default: ['a'])"),
    ("run_dir", "Output directory; keep 50%% of it. (default: '')"),
    ("undocumented", "(default: 3)"),
])
def test_help_is_docstring_plus_default(dest, text):
    assert helps()[dest] == text


def test_help_renders():
    text = make().format_help()
    assert "--augment, --no-augment" in text and "--batch-size" in text
    assert "keep 50% of it" in text and "{constant,triangular}" in text


def test_omitted_flags_are_absent():
    ns = make().parse_args([])
    assert vars(ns) == {}
    assert dataclass_kwargs(ns, Demo) == {}
    assert Demo(**dataclass_kwargs(ns, Demo)) == Demo()


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "3"], {"epochs": 3}),
    (["--lr", "1e-3"], {"lr": 0.001}),
    (["--name", "x"], {"name": "x"}),
    (["--batch-size", "8"], {"batch_size": 8}),
    (["--batch-size", "none"], {"batch_size": None}),
    (["--batch-size", "None"], {"batch_size": None}),
    (["--no-augment"], {"augment": False}),
    (["--augment"], {"augment": True}),
    (["--pretrained", "true"], {"pretrained": True}),
    (["--pretrained", "False"], {"pretrained": False}),
    (["--pretrained", "weights.pt"], {"pretrained": "weights.pt"}),
    (["--ref", "3"], {"ref": 3}),
    (["--ref", "best"], {"ref": "best"}),
    (["--scale", "0.5"], {"scale": 0.5}),
    (["--scale", "auto"], {"scale": "auto"}),
    (["--resources", "gpu_node=0.01"], {"resources": {"gpu_node": 0.01}}),
    (["--resources", "a=1, b=2.5"], {"resources": {"a": 1.0, "b": 2.5}}),
    (["--resources", '{"gpu_node": 1}'], {"resources": {"gpu_node": 1.0}}),
    (["--resources", ""], {"resources": {}}),
    (["--tags", "x", "y"], {"tags": ["x", "y"]}),
    (["--policy", "triangular"], {"policy": "triangular"}),
    (["--run-dir", "runs/x", "--undocumented", "4"], {"run_dir": "runs/x", "undocumented": 4}),
])
def test_each_type_parses(argv, expected):
    got = parse(argv)
    assert got == expected
    assert type(next(iter(got.values()))) is type(next(iter(expected.values())))


@pytest.mark.parametrize("argv", [
    ["--policy", "bogus"],
    ["--epochs", "x"],
    ["--epochs", "none"],  # not Optional: "none" is no int
    ["--batch-size", "1.5"],
    ["--resources", "gpu_node"],
    ["--resources", "gpu_node=lots"],
    ["--resources", "[1, 2]"],
    ["--resources", "{bad json"],
    ["--tags"],
])
def test_bad_values_exit_2(argv):
    assert exit_code(argv) == 2


def test_kwargs_build_the_dataclass():
    ns = make().parse_args(["--epochs", "2", "--no-augment", "--resources", "gpu_node=0.01"])
    kw = dataclass_kwargs(ns, Demo)
    assert kw == {"epochs": 2, "augment": False, "resources": {"gpu_node": 0.01}}
    assert dataclasses.replace(Demo(name="base"), **kw) == Demo(
        name="base", epochs=2, augment=False, resources={"gpu_node": 0.01})
    assert dataclass_kwargs(ns, Demo, skip=("epochs",)) == {
        "augment": False, "resources": {"gpu_node": 0.01}}


def test_rename_keeps_dest():
    assert parse(["--out", "runs/x"], rename={"run_dir": "out"}) == {"run_dir": "runs/x"}
    assert exit_code(["--run-dir", "runs/x"], rename={"run_dir": "out"}) == 2
    assert parse(["--no-aug"], rename={"augment": "--aug"}) == {"augment": False}


def test_required_and_skip():
    assert exit_code([], required=("name",)) == 2
    assert parse(["--name", "x"], required=("name",)) == {"name": "x"}
    assert helps(required=("name",))["name"] == "Run name, written to runs/NAME."
    assert "tags" not in helps(skip=("tags",))
    assert exit_code(["--tags", "x"], skip=("tags",)) == 2


def test_defaults_override_the_omitted_value():
    assert parse([], defaults={"name": "cli"}) == {"name": "cli"}
    assert parse(["--name", "x"], defaults={"name": "cli"}) == {"name": "x"}
    assert helps(defaults={"name": "cli"})["name"].endswith("(default: cli)")


def test_unknown_field_names_are_refused():
    for kw in ({"skip": ("nope",)}, {"rename": {"nope": "x"}}, {"required": ("nope",)},
               {"defaults": {"nope": 1}}):
        with pytest.raises(ValueError, match="nope"):
            make(**kw)


def test_argument_group_and_returned_actions():
    parser = argparse.ArgumentParser()
    actions = add_dataclass_flags(parser.add_argument_group("demo"), Demo)
    assert set(actions) == {f.name for f in dataclasses.fields(Demo)}
    assert actions["run_dir"].option_strings == ["--run-dir"]
    assert vars(parser.parse_args(["--epochs", "1"])) == {"epochs": 1}


def test_every_train_config_field_gets_a_documented_flag():
    from cxr_ray.train import TrainConfig

    parser = argparse.ArgumentParser()
    actions = add_dataclass_flags(parser, TrainConfig)
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig) if f.init}
    for name, action in actions.items():
        doc = action.help.rsplit(" (default: ", 1)[0]
        assert doc and "`" not in doc and ":class:" not in doc, (name, action.help)
    assert "--no-augment" in parser.format_help()
    ns = parser.parse_args(["--shards", "S", "--epochs", "3", "--no-augment", "--pretrained",
                            "false", "--batch-size", "none", "--worker-resources",
                            "gpu_node=0.01"])
    config = TrainConfig(**dataclass_kwargs(ns, TrainConfig))
    assert (config.shards, config.epochs, config.augment, config.pretrained) == ("S", 3, False,
                                                                               False)
    assert config.batch_size is None and config.worker_resources == {"gpu_node": 0.01}
    assert config.dropout == TrainConfig().dropout


@dataclass
class Child(Demo):
    """Adds a field and re-documents one."""

    epochs: int = 5
    """Fewer epochs."""
    extra: float | None = 0.5
    """An extra knob."""


def test_inherited_docs_and_sourceless_dataclass():
    docs = field_docs(Child)
    assert docs["epochs"] == "Fewer epochs." and docs["extra"] == "An extra knob."
    assert docs["name"] == "Run name, written to runs/NAME."
    Made = dataclasses.make_dataclass("Made", [("k", int, field(default=1))])
    parser = argparse.ArgumentParser()
    assert add_dataclass_flags(parser, Made)["k"].help == "(default: 1)"
    assert vars(parser.parse_args(["--k", "2"])) == {"k": 2}
