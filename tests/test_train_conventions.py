"""The training harness picks the conventions of its plans: the paper's models (LeNet-BN,
VGG 11–19) train under ``conventions="paper"`` — the paper's experiments — every other model
under the library's default, and ``--conventions`` overrides; ``config.json``, the summary and
the log say which set a run used, and the plan in its checkpoint was prepared with it."""
from __future__ import annotations

import json
import logging

import pytest

from fxbackmatch.analysis.conventions import Conventions
from fxbackmatch.cli import _parser
from fxbackmatch.errors import CliError
from fxbackmatch.train import TrainConfig, config_from_args, load_config, train
from fxbackmatch.train.config import PAPER_MODELS, default_conventions
from test_train import tiny_config, tiny_npz  # noqa: F401 (tiny_npz: a fixture)

import torch


def test_the_papers_models_default_to_the_papers_conventions():
    for name in PAPER_MODELS + ("vgg11-bn-paper", "vgg19-bn-paper"):
        assert default_conventions(name) == "paper", name
    for name in ("resnet18-paper", "tv:resnet18", "tv:vit_b_16"):
        assert default_conventions(name) == "default", name
    assert TrainConfig(model="vgg16").conventions_name == "paper"
    assert TrainConfig(model="tv:resnet18").conventions_name == "default"
    assert TrainConfig(model="vgg16", conventions="default").conventions_name == "default"
    with pytest.raises(CliError, match="--conventions must be one of default, paper"):
        TrainConfig(conventions="exact").validate()


def test_cli_option_and_resume(tmp_path):
    args = _parser().parse_args(["train", "--model", "vgg11", "--conventions", "default", "--out", str(tmp_path)])
    cfg, _ = config_from_args(args)
    assert cfg.conventions == "default"
    cfg, _ = config_from_args(_parser().parse_args(["train", "--model", "vgg11", "--out", str(tmp_path)]))
    assert cfg.conventions is None and cfg.conventions_name == "paper"
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--conventions", "exact"])
    # a run saved before the option trained under the paper's conventions (prepare's old default)
    d = TrainConfig(model="tv:resnet18").to_dict()
    d.pop("conventions")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert load_config(tmp_path).conventions_name == "paper"
    # the conventions of a run cannot change when it resumes
    d["conventions"] = "paper"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CliError, match="--conventions differs"):
        config_from_args(_parser().parse_args(["train", "--resume", str(tmp_path), "--conventions", "default"]))


@pytest.mark.parametrize("given", [None, "default"])
def test_a_run_records_and_uses_its_conventions(tiny_npz, tmp_path, given, caplog):  # noqa: F811
    """LeNet-BN (a paper model): ``config.json``, ``summary.json`` and the log name the set, and
    the checkpoint's plan was prepared with exactly its fields."""
    path, _ = tiny_npz
    cfg = tiny_config(path, tmp_path / "run", methods=("backmatch",), conventions=given)
    with caplog.at_level(logging.INFO, logger="fxbackmatch"):
        res = train(cfg)
    want = given or "paper"
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["conventions"] == want
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["conventions"] == want and summary["runs"]["backmatch/0"]["conventions"] == want
    assert res.runs["backmatch/0"]["conventions"] == want
    assert any(f"conventions={want}" in r.getMessage() for r in caplog.records)
    state = torch.load(out / "backmatch-seed0" / "checkpoint.pt", weights_only=True)["plan"]
    conv = Conventions.named(want)
    for key in ("gamma", "relu", "taps", "span", "moments", "unnormalized", "variance"):
        assert state[key] == getattr(conv, key), key
