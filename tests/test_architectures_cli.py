"""Every registered architecture trains and evaluates through the command line, on a tiny random llama.

The per-architecture files test the math; this file tests that each architecture fits the shared pipeline:
`saekit train --arch NAME` (options generated from its config), checkpoint, save, input-scale folding,
`saekit eval` with the splice into the model, and `saekit.load`.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import saekit
from saekit.cli import main
from saekit.models.tiny import byte_tokenizer, tiny_llama
from saekit.sae import available_architectures, get_architecture

HOOK = "layers.1.resid_post"

# Options that make an architecture small enough for d = 32, width 64 (only those its config has are passed).
SMALL = {"k": 4, "target_l0": 4.0}
# Architectures that do not read one hook point's activations are tested in their own files.
SPECIAL = {"meta", "multilayer"}
# A given tree for tree_given at width 64: 16 roots with 3 children each.
GIVEN_TREE = [-1] * 16 + [i // 3 for i in range(48)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-cli")
    model_dir = root / "model"
    tiny_llama(n_layers=3, d_model=32).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = root / "corpus.txt"
    paragraphs = [
        f"Paragraph {i} talks about sparse autoencoders and feature number {i * 7}." for i in range(400)
    ]
    text.write_text("\n\n".join(paragraphs))
    cache = root / "cache"
    argv = ["cache", "--model", str(model_dir), "--text", str(text), "--context-len", "32", "--hook", HOOK,
            "--tokens", "3000", "--out", str(cache), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return root, cache


def _small_options(arch: str) -> list[str]:
    fields = {f.name for f in dataclasses.fields(get_architecture(arch).config_class)}
    options: list[str] = []
    for name, value in SMALL.items():
        if name in fields:
            options += ["--" + name.replace("_", "-"), str(value)]
    return options


@pytest.mark.parametrize("arch", [a for a in available_architectures() if a not in SPECIAL])
def test_every_architecture_trains_and_evaluates_from_the_cli(arch, tiny_setup, capsys):
    root, cache = tiny_setup
    run = root / f"run-{arch}"
    extra = []
    if arch == "tree_given":
        tree = root / "tree.json"
        tree.write_text(json.dumps(GIVEN_TREE))
        extra = ["--parents-file", str(tree)]
    train = ["train", "--cache", str(cache), "--arch", arch, "--expansion", "2", "--tokens", "2048",
             "--batch-size", "256", "--warmup-steps", "2", "--progress", "false", "--eval-tokens", "256",
             "--out", str(run), *_small_options(arch), *extra]  # fmt: skip
    assert main(train) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["arch"] == arch and summary["train"]["steps"] == 8
    assert 0 < summary["eval"]["l0"] <= 64 and summary["eval"]["fvu"] == pytest.approx(summary["eval"]["fvu"])
    assert summary["eval"]["ce_loss_recovered"] is not None

    sae = saekit.load(run)
    assert (sae.arch, sae.d_in, sae.width) == (arch, 32, 64)
    x = torch.randn(5, 32)
    assert torch.equal(sae.encode(x), sae.encode(x))  # inference is deterministic
    assert torch.isfinite(sae.decode(sae.encode(x))).all()

    assert main(["info", str(run)]) == 0
    if arch.startswith("tree"):
        assert "root" in capsys.readouterr().out  # the learned or given tree is printed

    out_json = root / f"eval-{arch}.json"
    assert main(["eval", str(run), "--tokens", "256", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["splice"]["ce_loss_recovered"] is not None
    capsys.readouterr()


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_eval_afa_and_progressive(arch, tiny_setup, tmp_path, capsys):
    root, cache = tiny_setup
    run = root / f"run-{arch}"
    if not (run / "summary.json").exists():
        train = ["train", "--cache", str(cache), "--arch", arch, "--expansion", "2", "--tokens", "2048",
                 "--batch-size", "256", "--progress", "false", "--eval-tokens", "0", "--out", str(run),
                 "--k", "4"]  # fmt: skip
        assert main(train) == 0
    out_json = tmp_path / "eval.json"
    argv = ["eval", str(run), "--tokens", "256", "--afa", "--progressive", "--progressive-widths", "3",
            "--progressive-ce-tokens", "64", "--plots-dir", str(tmp_path),
            "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "median εLBO" in printed and "progressive coding" in printed
    extra = json.loads(out_json.read_text())["extra"]
    assert extra["afa"]["eps_lbo_median"] >= 0
    rows = extra["progressive"]["rows"]
    assert [r["width"] for r in rows] == [16, 32, 64]
    assert extra["progressive"]["order"] == ("index" if arch == "matryoshka" else "energy")
    assert rows[-1]["l0"] >= rows[0]["l0"]  # truncation keeps a subset of the code
    full = json.loads(out_json.read_text())["reconstruction"]
    assert rows[-1]["fvu"] == pytest.approx(full["fvu"], rel=1e-6)  # G = M is the SAE itself
    for png in ("zf_plot.png", "progressive.png"):
        assert (tmp_path / png).stat().st_size > 1000
