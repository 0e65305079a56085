"""Every default has one source, RunConfig; the places that show defaults are checked against it.

- the root ``pyproject.toml``'s ``[tool.flwr.app.config]`` (what ``flwr run .`` uses) equals
  :func:`scfedvi.flower.settings.default_run_config` (regenerate it with ``make flwr-config``);
- every ``(default: X)`` in ``scfedvi ... --help`` is RunConfig's value (``annotate``:
  AnnotateConfig's), or is an option that RunConfig does not hold (listed below with where its
  default lives).
"""

from __future__ import annotations

import argparse
import inspect
import re
import tomllib
from pathlib import Path

import pytest

from scfedvi.cli import build_parser
from scfedvi.config import RunConfig
from scfedvi.flower.settings import config_section, default_run_config, rewrite_config_section

ROOT = Path(__file__).resolve().parents[1]

#: Options whose help shows a RunConfig default: option -> (section, field).
RUN_CONFIG_OPTIONS = {
    "--rounds": ("federation", "n_rounds"),
    "--seed": ("federation", "seed"),
    "--patience": ("federation", "early_stopping_patience"),
    "--norm-stats": ("federation", "norm_stats"),
    "--batch-size": ("train", "batch_size"),
    "--accelerator": ("train", "accelerator"),
    "--device": ("train", "device"),
    # None in RunConfig: the help describes the rule that decides (no number)
    "--local-epochs": ("train", "local_epochs"),
    "--max-epochs": ("federation", "max_epochs"),
    "--n-jobs": ("federation", "n_jobs"),
}
#: Options whose default is not a run setting: (command, option) -> where it is defined.
NOT_RUN_CONFIG = {
    (None, "--threads"): "the process's torch threads (cli.py)",
    ("demo", "--out"): "demo output folder",
    ("demo", "--cells"): "demo data (demo.run_demo)",
    ("demo", "--genes"): "demo data (demo.run_demo)",
    ("demo", "--composition"): "demo data (demo.run_demo)",
    ("train", "--dp-noise"): "the noise the command pairs with --dp-clip (off without it)",
    ("train", "--layer"): "X, the AnnData's matrix",
    ("embed", "--site"): "the input's file name",
    ("embed", "--layer"): "the saved model's layer",
    ("benchmark", "--batch-key"): "each data set's own (benchmark/plan.py)",
    ("benchmark", "--label-key"): "each data set's own (benchmark/plan.py)",
    ("benchmark", "--layer"): "X, the AnnData's matrix",
    ("benchmark", "--clients"): "the benchmark's grid (benchmark/cli.py)",
    ("benchmark", "--seeds"): "the benchmark's grid (benchmark/cli.py)",
    ("benchmark", "--jobs"): "the benchmark's worker processes",
    ("benchmark", "--n-top-genes"): "the benchmark's gene selection",
    ("benchmark", "--label-transfer"): "where the report reads label_transfer.py's results",
}
#: ``scfedvi annotate`` (federated scANVI): its defaults are AnnotateConfig's.
ANNOTATE_OPTIONS = {
    "--rounds": "n_rounds",
    "--local-epochs": "local_epochs",
    "--unlabeled-category": "unlabeled_category",
}


def _shown_defaults(parser: argparse.ArgumentParser, command: str | None = None):
    """(command, option, shown default) for every help text that says ``default: X``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _shown_defaults(sub, name)
            continue
        m = re.search(r"default:\s*([^;,)]+)", action.help or "")
        if m and action.option_strings:
            yield command, action.option_strings[-1], m.group(1).strip(), action


def test_pyproject_flower_config_is_run_config() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        section = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    expected = default_run_config()
    assert section == expected, (
        "pyproject.toml's [tool.flwr.app.config] differs from RunConfig's defaults: "
        f"{sorted(set(section.items()) ^ set(expected.items()))}; run `make flwr-config`"
    )


def test_rewrite_replaces_only_the_section(tmp_path: Path) -> None:
    p = tmp_path / "pyproject.toml"
    p.write_text(
        '[project]\nname = "x"\n\n[tool.flwr.app.config]\nlocal-epochs = 10\n'
        "num-server-rounds = 40\n\n[tool.other]\nkeep = 1\n"
    )
    assert rewrite_config_section(p) is True
    data = tomllib.loads(p.read_text())
    assert data["tool"]["flwr"]["app"]["config"] == default_run_config()
    assert data["tool"]["other"] == {"keep": 1} and data["project"] == {"name": "x"}
    assert rewrite_config_section(p) is False  # idempotent
    assert p.read_text().count(config_section()) == 1


def test_rewrite_without_the_section_says_so(tmp_path: Path) -> None:
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match=r"no \[tool.flwr.app.config\] section"):
        rewrite_config_section(p)


def test_every_default_in_help_is_run_configs() -> None:
    cfg = RunConfig()
    shown = list(_shown_defaults(build_parser()))
    checked = set()
    for command, option, text, action in shown:
        if command == "annotate" and option in ANNOTATE_OPTIONS:
            from scfedvi.annotate.model import AnnotateConfig

            value = getattr(AnnotateConfig(), ANNOTATE_OPTIONS[option])
            assert text == str(value), f"scfedvi annotate {option}: {text}, AnnotateConfig {value}"
        elif option in RUN_CONFIG_OPTIONS and command in ("train", "demo"):
            section, field = RUN_CONFIG_OPTIONS[option]
            value = getattr(getattr(cfg, section), field)
            if value is None:
                assert not re.fullmatch(r"[-+.\d e]+", text), (
                    f"scfedvi {command} {option}: help shows {text}, RunConfig None (a rule)"
                )
            else:
                assert text == str(value), (
                    f"scfedvi {command} {option}: help shows {text}, RunConfig {value}"
                )
            if action.default is not None:  # a default the parser fills in is RunConfig's too
                assert action.default == value, f"scfedvi {command} {option}: {action.default}"
            checked.add(option)
        else:
            assert (command, option) in NOT_RUN_CONFIG, (
                f"scfedvi {command} {option} shows 'default: {text}': take it from RunConfig "
                "(cli._RUN) and add the option to RUN_CONFIG_OPTIONS, or list it in NOT_RUN_CONFIG"
            )
    assert checked >= {"--rounds", "--seed", "--batch-size", "--norm-stats"}


def test_train_n_top_genes_is_the_apis() -> None:
    """Not a RunConfig field: the command, the Python API and the Flower app agree on it."""
    from scfedvi.flower.settings import AppSettings
    from scfedvi.model import ScFedVI

    train = _subparser("train")
    option = next(a for a in train._actions if "--n-top-genes" in a.option_strings)
    api = inspect.signature(ScFedVI.from_sites).parameters["n_top_genes"].default
    assert option.default == api == AppSettings().n_top_genes


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_demo_help_states_its_measured_time() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo_help = next(c.help for c in sub._choices_actions if c.dest == "demo")
    assert "about a minute" not in demo_help and "136 s" in demo_help
