"""The command line end to end on a tiny saved model, the config → CLI generator, and the main job."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from saekit.cli import build_parser, main
from saekit.config import add_dataclass_args, dataclass_from_args, field_docs
from saekit.models.tiny import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(n_layers=3, d_model=32).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    paragraphs = [
        f"Paragraph {i} talks about sparse autoencoders and feature number {i * 7}." for i in range(400)
    ]
    path.write_text("\n\n".join(paragraphs))
    return path


@dataclass
class _Example:
    count: int = 3
    """How many things."""
    ratio: float | None = None
    """An optional ratio."""
    flag: bool = False
    """A switch."""
    mode: Literal["a", "b"] = "a"
    """One of two modes."""
    names: list[str] = field(default_factory=lambda: ["x"])
    """Repeatable names."""

    def validate(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def _parse(argv: list[str], base: dict | None = None) -> _Example:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Example, aliases={"n": "count"})
    return dataclass_from_args(_Example, parser.parse_args(argv), base=base)


def test_config_fields_become_options_with_their_docstrings_as_help():
    assert field_docs(_Example)["ratio"] == "An optional ratio."
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Example)
    help_text = parser.format_help()
    assert "--count" in help_text and "How many things." in help_text and "(default: 3)" in help_text


def test_config_parsing_types_flags_lists_aliases_and_priority():
    assert _parse([]) == _Example()
    got = _parse(["--n", "5", "--ratio", "0.5", "--flag", "--mode", "b", "--names", "p", "--names", "q"])
    assert got == _Example(count=5, ratio=0.5, flag=True, mode="b", names=["p", "q"])
    assert _parse(["--flag", "false"]).flag is False
    # the command line wins over a config file, which wins over defaults
    assert _parse(["--count", "7"], base={"count": 4, "mode": "b"}) == _Example(count=7, mode="b")
    with pytest.raises(ValueError, match="unknown settings.*bogus"):
        _parse([], base={"bogus": 1})
    with pytest.raises(ValueError, match="count must be"):
        _parse(["--count", "-1"])
    with pytest.raises(SystemExit):
        _parse(["--mode", "c"])


def test_help_lists_every_command():
    help_text = build_parser(["--help"]).format_help()
    for command in ("cache", "info", "train", "eval", "archs"):
        assert command in help_text


def test_train_options_follow_the_architecture():
    parser = build_parser(["train", "--arch", "jumprelu"])
    args = parser.parse_args(["train", "--arch", "jumprelu", "--l0", "40", "--bandwidth", "0.1"])
    assert args.target_l0 == 40 and args.bandwidth == 0.1
    with pytest.raises(SystemExit):
        build_parser(["train", "--arch", "topk"]).parse_args(
            ["train", "--arch", "topk", "--bandwidth", "0.1"]
        )


def test_cache_info_train_eval_on_a_tiny_model(tiny_model_dir, text_file, tmp_path, capsys):
    cache_dir, run_dir = tmp_path / "cache", tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--text", str(text_file), "--context-len", "32"]
    assert (
        main(
            [
                "cache",
                *common,
                "--hook",
                "layers.1.resid_post",
                "--tokens",
                "3000",
                "--out",
                str(cache_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["info", str(cache_dir)]) == 0
    assert "layers.1.resid_post" in capsys.readouterr().out

    train = ["train", "--cache", str(cache_dir), "--arch", "topk", "--k", "4", "--expansion", "2",
             "--tokens", "2048", "--batch-size", "256", "--warmup-steps", "2", "--progress", "false",
             "--eval-tokens", "256", "--out", str(run_dir)]  # fmt: skip
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "CE loss recovered" in out and "fvu" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 8 and summary["eval"]["l0"] == pytest.approx(4.0)
    for name in ("sae/cfg.json", "sae/sae.safetensors", "metrics.jsonl", "train_curve.png", "eval.json"):
        assert (run_dir / name).is_file(), name

    import saekit

    sae = saekit.load(run_dir)
    assert (sae.arch, sae.width, sae.d_in) == ("topk", 64, 32)
    assert sae.metadata["hook"] == "layers.1.resid_post"

    eval_json = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--tokens", "256", "--no-splice", "--json", str(eval_json)]) == 0
    assert json.loads(eval_json.read_text())["splice"] is None

    # a second identical `train` resumes from the finished checkpoint and retrains nothing
    assert main(train) == 0
    assert json.loads((run_dir / "summary.json").read_text())["train"]["steps"] == 8


def test_bad_input_gives_a_clear_error_and_exit_code(tiny_model_dir, text_file, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--text", str(text_file), "--out", str(tmp_path / "r")]
    assert main(["train", *common, "--hook", "layers.9.resid_post", "--tokens", "512"]) == 2
    assert "layers.{0..2}" in capsys.readouterr().err
    assert main(["train", *common, "--hook", "layers.1.resid_post", "--k", "100", "--expansion", "2"]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such cache directory" in capsys.readouterr().err


@pytest.mark.smollm2
def test_main_job_runs_small_on_smollm2(tmp_path, capsys):
    """The default job (TopK on SmolLM2 layers.15.resid_post, built-in text), shrunk to 4k tokens."""
    run_dir = tmp_path / "run"
    argv = ["--tokens", "4096", "--eval-tokens", "512", "--progress", "false", "--out", str(run_dir)]
    assert main(argv) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["arch"] == "topk" and summary["hook"] == "layers.15.resid_post"
    assert summary["eval"]["l0"] == pytest.approx(32.0)
    assert 0.0 < summary["eval"]["fvu"] < 1.0
    assert summary["eval"]["ce_loss_recovered"] > 0.0
