"""`saekit sweep`: the grid (which options reach which architecture, width factors), bad specs, the Pareto
frontier, and a small sweep on a tiny model end to end, then resumed (finished runs are not retrained)."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

import saekit.sweep as sweep
from saekit.cli import main
from saekit.models.tiny import byte_tokenizer, tiny_llama
from saekit.sweep import SweepConfig, add_sweep_parser, cmd_sweep, pareto_front, plan_sweep


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A 3000-token cache of layers.1.resid_post (d = 32) of a tiny random llama."""
    root = tmp_path_factory.mktemp("sweep-data")
    model_dir, text = root / "model", root / "corpus.txt"
    tiny_llama(n_layers=2, d_model=32).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text("\n\n".join(f"Paragraph {i} is about sparse feature number {i * 7}." for i in range(400)))
    argv = ["cache", "--model", str(model_dir), "--text", str(text), "--context-len", "32",
            "--hook", "layers.1.resid_post", "--tokens", "3000", "--out", str(root / "cache"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return root / "cache"


def _cfg(**kw) -> SweepConfig:
    return SweepConfig(cache="unused", out="unused", **kw)


def _sweep_args(argv: list[str]) -> argparse.Namespace:
    """Parse as `saekit sweep ARGV` would once the command is wired into saekit.cli."""
    parser = argparse.ArgumentParser(prog="saekit")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


def test_grid_options_reach_only_the_architectures_that_have_them():
    cfg = _cfg(archs=["topk", "relu", "jumprelu", "gated"], grid=["k=8,16", "l1=1,2.5", "l0=4"])
    points = {(p.arch, p.options) for p in plan_sweep(cfg)}
    assert points == {
        ("topk", (("k", 8),)),
        ("topk", (("k", 16),)),
        ("relu", (("l1_coeff", 1.0),)),
        ("relu", (("l1_coeff", 2.5),)),
        ("gated", (("l1_coeff", 1.0),)),
        ("gated", (("l1_coeff", 2.5),)),
        ("jumprelu", (("target_l0", 4.0),)),
    }
    # values take their field's type, and an architecture with none of the grid's fields runs once
    assert all(isinstance(p.options[0][1], int if p.arch == "topk" else float) for p in plan_sweep(cfg))
    points = plan_sweep(_cfg(archs=["topk", "relu"], grid=["k=8,16"], expansions=[2.0, 4.0]))
    assert [p.name for p in points] == [
        "topk-k8-x2",
        "topk-k8-x4",
        "topk-k16-x2",
        "topk-k16-x4",
        "relu-x2",
        "relu-x4",
    ]
    crossed = plan_sweep(_cfg(archs=["jumprelu"], grid=["l0=4,8", "bandwidth=0.1,0.2"]))
    assert [p.name for p in crossed] == [
        "jumprelu-target_l04-bandwidth0.1-x8",
        "jumprelu-target_l04-bandwidth0.2-x8",
        "jumprelu-target_l08-bandwidth0.1-x8",
        "jumprelu-target_l08-bandwidth0.2-x8",
    ]


def test_width_factor_widens_one_architecture():
    points = plan_sweep(_cfg(archs=["topk", "relu"], expansions=[2.0, 4.0], width_factor=["relu=1.5"]))
    assert {(p.arch, p.run_expansion) for p in points} == {("topk", 2), ("topk", 4), ("relu", 3), ("relu", 6)}
    assert [p.name for p in points if p.arch == "relu"] == ["relu-x3", "relu-x6"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"grid": ["k"]}, "NAME=V1,V2"),
        ({"grid": ["k="]}, "NAME=V1,V2"),
        ({"grid": ["k=1,,2"]}, "NAME=V1,V2"),
        ({"grid": ["bogus=1"]}, "none of the architectures .* has an option 'bogus'"),
        ({"grid": ["l0=4"]}, "has an option 'target_l0'"),  # topk and relu have no target L0
        ({"grid": ["k=1.5"]}, "'1.5' is not a valid value of topk's k"),
        ({"grid": ["k=4,4"]}, "repeats a value"),
        ({"grid": ["k=4", "k=8"]}, "names k twice"),
        ({"grid": ["width=64"]}, "--expansions"),
        ({"width_factor": ["relu"]}, "ARCH=F"),
        ({"width_factor": ["relu=0"]}, "ARCH=F"),
        ({"width_factor": ["relu=wide"]}, "ARCH=F"),
        ({"width_factor": ["gated=1.5"]}, "'gated' is not one of the sweep's --archs"),
        ({"archs": ["topk", "nope"]}, "unknown architecture 'nope'"),
        ({"archs": ["topk", "topk"]}, "without repeats"),
        ({"expansions": [0.0]}, "positive"),
    ],
)
def test_bad_specs_give_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**{"archs": ["topk", "relu"], **kw}).validate()


def test_impossible_settings_fail_before_any_training(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_train_job", lambda job: pytest.fail("trained despite a bad setting"))
    args = _sweep_args(
        ["--cache", str(cache_dir), "--out", str(tmp_path), "--grid", "k=4,100", "--expansions", "2"]
    )
    with pytest.raises(ValueError, match="k must be"):  # k = 100 > width 64
        cmd_sweep(args)
    assert not (tmp_path / "runs").exists()


def test_pareto_front():
    # lower is better: (4, 0.3) ties (3, 0.3) at a higher L0 and (2, 0.6) is beaten by (1, 0.5)
    points = [(2.0, 0.6), (1.0, 0.5), (3.0, 0.3), (4.0, 0.3), (5.0, 0.1)]
    assert pareto_front(points, higher_better=False) == [1, 2, 4]
    assert pareto_front(points, higher_better=True) == [1, 0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.3)], higher_better=False) == [1]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_trains_every_point_writes_results_and_resumes(cache_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["--cache", str(cache_dir), "--out", str(out), "--archs", "topk", "relu",
            "--grid", "k=2,4", "--grid", "l1=1,2", "--expansions", "2", "--width-factor", "relu=1.5",
            "--tokens", "1024", "--batch-size", "256", "--warmup-steps", "2", "--progress", "false",
            "--eval-tokens", "256"]  # fmt: skip
    assert cmd_sweep(_sweep_args(argv)) == 0
    names = ["topk-k2-x2", "topk-k4-x2", "relu-l1_coeff1-x3", "relu-l1_coeff2-x3"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == names
    assert [r["options"] for r in rows] == [{"k": 2}, {"k": 4}, {"l1_coeff": 1.0}, {"l1_coeff": 2.0}]
    assert [r["width"] for r in rows] == [64, 64, 96, 96]  # d = 32; relu 1.5× wider
    assert [r["l0"] for r in rows[:2]] == pytest.approx([2.0, 4.0])  # TopK's L0 is k
    for r in rows:
        summary = json.loads((out / "runs" / r["name"] / "summary.json").read_text())
        assert summary["train"]["steps"] == 4 and r["fvu"] == summary["eval"]["fvu"]
        assert r["ce_loss_recovered"] == summary["eval"]["ce_loss_recovered"] is not None
        assert r["run"] == str(out / "runs" / r["name"]) and r["train_seconds"] > 0
        assert 0.0 <= r["dead_fraction"] <= 1.0
    table = _read_csv(out / "results.csv")
    assert [(t["arch"], t["options"], t["width"]) for t in table] == [
        ("topk", "k=2", "64"), ("topk", "k=4", "64"),
        ("relu", "l1_coeff=1", "96"), ("relu", "l1_coeff=2", "96"),
    ]  # fmt: skip
    assert float(table[2]["fvu"]) == rows[2]["fvu"]
    for png in ("pareto_fvu.png", "pareto_ce.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # again: every run is finished, so nothing trains and the same results come back
    from saekit.train import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was retrained"))
    monkeypatch.setattr(sweep, "run_train_job", lambda job: pytest.fail("a finished run was rerun"))
    assert cmd_sweep(_sweep_args(argv)) == 0
    assert json.loads((out / "results.json").read_text()) == rows
    assert capsys.readouterr().out.count("finished before") == 4

    # an unfinished run (no summary.json) goes back to its job, which resumes from the trainer's checkpoint
    monkeypatch.undo()
    from saekit.train_job import run_train_job

    rerun = []
    monkeypatch.setattr(sweep, "run_train_job", lambda job: rerun.append(job.out) or run_train_job(job))
    (out / "runs" / names[1] / "summary.json").unlink()
    assert cmd_sweep(_sweep_args(argv)) == 0
    assert rerun == [str(out / "runs" / names[1])]
    train_summary = json.loads((out / "runs" / names[1] / "train_summary.json").read_text())
    assert train_summary["resumed_from_step"] == 4 and train_summary["steps"] == 4
    assert json.loads((out / "results.json").read_text())[1]["l0"] == pytest.approx(4.0)
