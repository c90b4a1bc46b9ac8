"""Config you can find: ``clicktower config`` lists every key with its type, default and help
(from the dataclasses' own ``Args:`` sections), docs/config.md is its current output, and every
command's ``--help`` answers without importing torch."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from clicktower.launcher.cli import COMMANDS, main as clicktower_main
from clicktower.launcher.engine.config import ExperimentConfig
from clicktower.launcher.engine.config_keys import config_keys, field_help, first_sentence, render_text

from conftest import REPO, TINY_CONFIG

DOC = REPO / "docs" / "config.md"
# Keys that README.md and docs/ never named before docs/config.md (issue 27).
ONCE_UNNAMED = ("optim.lr", "optim.warmup_steps", "optim.weight_decay", "train.seed", "model.pooling")


def _sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(ExperimentConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(ExperimentConfig)]


@pytest.mark.unit
def test_every_config_field_has_its_own_help():
    """A new field without an ``Args:`` entry fails here (the listing's only source of help)."""
    undocumented = []
    for name, cls in _sections():
        classes = [cls] + [t for t in typing.get_type_hints(cls).values()
                           for t in typing.get_args(t) if dataclasses.is_dataclass(t)]
        for each in classes:
            helps = field_help(each)
            undocumented += [f"{name}: {each.__name__}.{f.name}" for f in dataclasses.fields(each)
                             if f.init and not helps.get(f.name)]
    assert not undocumented
    keys = config_keys(ExperimentConfig)
    assert len(keys) == len({k.name for k in keys}) > 80
    assert all(k.help and k.help != "(undocumented)" for k in keys)


@pytest.mark.unit
def test_docs_config_md_is_the_current_output(capsys):
    assert clicktower_main(["config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    assert DOC.read_text(encoding="utf-8") == generated, (
        "docs/config.md is stale: run `clicktower config --markdown > docs/config.md`")
    for key in config_keys(ExperimentConfig):
        assert f"| `{key.name}` |" in generated
    for name in ONCE_UNNAMED:
        assert f"| `{name}` |" in generated
    assert "| `optim.lr` | float | `5.0e-05` | peak learning rate of the towers. |" in generated
    assert "| `model.pooling` | mean \\| cls | `mean` |" in generated
    assert "config.md" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.unit
def test_clicktower_config_prints_defaults_or_a_configs_values(capsys):
    assert clicktower_main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split("=", 1)[0]: line for line in lines if not line.startswith("#")}
    assert set(by_key) == {k.name for k in config_keys(ExperimentConfig)}
    assert by_key["optim.warmup_steps"].split()[:2] == ["optim.warmup_steps=0", "int"]
    assert "linear warmup from 0 to lr" in by_key["optim.warmup_steps"]
    assert by_key["optim.betas"].startswith("optim.betas=[0.9, 0.999] ")  # as __post_init__ fills it
    assert by_key["model.pooling"].split()[1:4] == ["mean", "|", "cls"]

    assert clicktower_main(["config", "--config", str(TINY_CONFIG), "optim.lr=0.001", "train.seed=7"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("optim.lr="))
    assert line.startswith("optim.lr=0.001 ") and "(default 5.0e-05)" in line
    assert next(x for x in out.splitlines() if x.startswith("train.seed=")).startswith("train.seed=7 ")
    untouched = next(x for x in out.splitlines() if x.startswith("optim.eps="))
    assert "(default" not in untouched

    assert clicktower_main(["config", "--config", str(TINY_CONFIG), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clicktower: error: unknown key optim.lrr")


@dataclass
class _Toy:
    """A toy section.

    Args:
        alpha: first line,
            continued here. Second sentence.
        beta: e.g. this, i.e. that. Then more.

    Returns:
        nothing.
    """

    alpha: int = 1
    beta: typing.Literal["x", "y"] | None = None
    gamma: float = 0.5


@pytest.mark.unit
def test_field_help_reads_the_args_section_only():
    helps = field_help(_Toy)
    assert helps == {"alpha": "first line, continued here. Second sentence.",
                     "beta": "e.g. this, i.e. that. Then more."}
    assert first_sentence(helps["alpha"]) == "first line, continued here."
    assert first_sentence(helps["beta"]) == "e.g. this, i.e. that."
    keys = config_keys(_Toy, "toy.")
    assert [(k.name, k.type, k.default) for k in keys] == [
        ("toy.alpha", "int", 1), ("toy.beta", "x | y | null", None), ("toy.gamma", "float", 0.5)]
    assert keys[2].help == "(undocumented)"
    assert render_text(keys).splitlines()[1].startswith("toy.beta=null  x | y | null  e.g. this, i.e. that.")


# Each command's --help, and the subcommands' of ckpt, slurm and teacher.
HELP_ARGS = [[name, "--help"] for name in COMMANDS] + [["ckpt", "convert", "--help"], ["slurm", "submit", "--help"],
                                                   ["teacher", "train", "--help"], ["teacher", "score", "--help"],
                                                   ["teacher", "eval", "--help"]]
_PROBE = """
import json, sys
from clicktower.launcher.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
heavy = [m for m in ("torch", "transformers", "accelerate", "deepspeed") if m in sys.modules]
print(json.dumps(heavy), file=sys.stderr)
"""


@pytest.mark.unit
def test_help_imports_neither_torch_nor_transformers():
    """``clicktower <command> --help`` answers before any heavy import (it took ~9 s)."""
    import json

    for args in HELP_ARGS:
        done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True,
                              text=True, timeout=120, cwd=Path(REPO).parent)
        assert "usage: clicktower" in done.stdout, (args, done.stderr[-2000:])
        assert json.loads(done.stderr.strip().splitlines()[-1]) == [], args
        if args[0] == "train":   # where a user looks first for the keys
            assert "clicktower config" in done.stdout
