"""The train job's data paths besides one hook point: several hook points for a multi-hook SAE (the MLSAE,
extracted in one forward, batches of one block per hook of the same tokens, evaluated at each hook), and an
SAE's own training rows (no model, no cache; evaluated on the rows)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import saekit
import saekit.activations.extract as extract_module
import saekit.models
from saekit.cli import main
from saekit.eval.synthetic import synthetic_activations
from saekit.jobs import (
    ExtractConfig,
    cache_batch_source,
    expand_hooks,
    rows_batch_source,
    run_cache,
    select_cache_hooks,
    streaming_batch_source,
)
from saekit.models import LoadedModel
from saekit.models.tiny import byte_tokenizer, tiny_llama
from saekit.sae import register
from saekit.sae.topk import TopKConfig, TopKSAE

EVERY_LAYER = [f"layers.{i}.resid_post" for i in range(3)]
SAME = ["layers.0.resid_post", "layers.1.resid_pre"]
"""Two names of one activation (block 0's output is block 1's input): aligned blocks must be equal."""


@dataclass
class _RowsConfig(TopKConfig):
    rows_file: str = ""
    """A .npy file of (N, d) rows to train on (empty: train on activations, as TopK)."""


@register("test_own_rows")
class _OwnRowsSAE(TopKSAE):
    """A TopK SAE that, like the meta-SAE, brings its own training rows."""

    config_class = _RowsConfig

    @classmethod
    def own_training_rows(cls, options):
        return torch.from_numpy(np.load(options["rows_file"])) if options.get("rows_file") else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-paths")
    model = tiny_llama(n_layers=3, d_model=32)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    text = root / "corpus.txt"
    paragraphs = [
        f"Paragraph {i} talks about sparse autoencoders and feature number {i * 7}." for i in range(400)
    ]
    text.write_text("\n\n".join(paragraphs))
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", str(root / "model"), "0" * 16)
    return root, loaded, text


def _multiset(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.unique(rows, dim=0, return_counts=True)


def _common(root, text) -> list[str]:
    return ["--model", str(root / "model"), "--text", str(text), "--context-len", "32"]


def test_star_means_every_layer():
    model = tiny_llama(n_layers=3, d_model=8)
    got = expand_hooks(model, ["layers.*.resid_post", "layers.1.resid_post", "layers.2.mlp_out"])
    assert got == [*EVERY_LAYER, "layers.2.mlp_out"]
    in_cache = ["layers.0.resid_post", "layers.0.mlp_out", "layers.1.resid_post"]
    assert select_cache_hooks(in_cache, ["layers.*.resid_post"]) == [
        "layers.0.resid_post",
        "layers.1.resid_post",
    ]
    with pytest.raises(ValueError, match="no hook point of the cache matches"):
        select_cache_hooks(in_cache, ["layers.*.attn_out"])


def test_cached_hook_points_come_in_aligned_blocks_and_resume(setup, tmp_path):
    root, loaded, text = setup
    extract = ExtractConfig(text=str(text), hook=[*SAME, "layers.2.resid_post"], context_len=32)
    cache = run_cache(extract, 1500, tmp_path / "cache", loaded=loaded)
    source = cache_batch_source(cache, cache.hooks, 96, seed=0)  # 32 tokens × 3 hooks
    batches = list(itertools.islice(source(0), 60))  # 60 × 32 > 1500: crosses an epoch
    assert all(b.shape == (96, 32) for b in batches)
    for b in batches:
        assert torch.equal(b[:32], b[32:64])  # the same tokens in every block
    epoch = torch.cat([b[:32] for b in batches])[:1500]  # block 0 over the first epoch: a permutation
    want = torch.from_numpy(cache.acts(SAME[0])[:])
    assert all(torch.equal(a, b) for a, b in zip(_multiset(epoch), _multiset(want), strict=True))
    for got, want in zip(itertools.islice(source(7), 5), batches[7:12], strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="smaller than the 3 hook points"):
        cache_batch_source(cache, cache.hooks, 2, seed=0)


def test_streamed_hook_points_come_in_aligned_blocks_and_resume(setup):
    root, loaded, text = setup
    extract = ExtractConfig(text=str(text), hook=SAME, context_len=32)
    source = streaming_batch_source(loaded, extract, 64, seed=0, buffer_rows=512)
    batches = list(itertools.islice(source(0), 6))
    for b in batches:
        assert b.shape == (64, 32) and torch.equal(b[:32], b[32:])
    assert torch.equal(next(iter(source(4))), batches[4])


def test_own_rows_come_in_shuffled_epochs_and_resume():
    rows = torch.arange(10.0)[:, None]
    source = rows_batch_source(rows, 4, seed=3)
    batches = list(itertools.islice(source(0), 5))
    assert all(b.shape == (4, 1) for b in batches)
    stream = torch.cat(batches).flatten()
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(
        range(10)
    )
    assert not torch.equal(stream[:10], stream[10:20])  # each epoch its own permutation
    assert torch.equal(next(iter(source(3))), batches[3])


def test_multilayer_trains_on_every_layer_from_one_forward_and_reports_each(
    setup, tmp_path, monkeypatch, capsys
):
    root, _, text = setup
    calls = []
    real_forward = extract_module.forward_to_hooks

    def counting_forward(model, ids, hooks):
        calls.append(list(hooks))
        return real_forward(model, ids, hooks)

    monkeypatch.setattr(extract_module, "forward_to_hooks", counting_forward)
    run = tmp_path / "run"
    argv = ["train", "--arch", "multilayer", *_common(root, text), "--k", "4", "--expansion", "2",
            "--tokens", "3072", "--batch-size", "384", "--warmup-steps", "2", "--progress", "false",
            "--eval-tokens", "256", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mean over 3 hook points" in out and "layers.2.resid_post" in out
    assert calls and all(c == EVERY_LAYER for c in calls)  # every layer cached by the same forward
    cache = saekit.open_cache(run / "activations")
    assert cache.hooks == EVERY_LAYER and cache.n_tokens == 1024  # 3072 rows = 1024 tokens × 3 layers

    summary = json.loads((run / "summary.json").read_text())
    assert summary["hooks"] == EVERY_LAYER and summary["train"]["steps"] == 8
    assert set(summary["eval"]["layers"]) == set(EVERY_LAYER)
    for layer in summary["eval"]["layers"].values():
        assert layer["l0"] == pytest.approx(4.0) and 0 < layer["fvu"] and layer["kl"] is not None
    assert summary["eval"]["fvu"] == pytest.approx(
        np.mean([v["fvu"] for v in summary["eval"]["layers"].values()])
    )
    assert set(json.loads((run / "eval.json").read_text())["layers"]) == set(EVERY_LAYER)
    sae = saekit.load(run)
    assert sae.cfg.n_layers == 3 and sae.metadata["hooks"] == EVERY_LAYER and "hook" not in sae.metadata

    assert main(["eval", str(run), "--tokens", "256", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["layers"]) == set(EVERY_LAYER)
    for hook, layer in result["layers"].items():
        assert layer["hook"] == hook and layer["splice"]["ce_loss_recovered"] is not None
        assert layer["reconstruction"]["l0"] == pytest.approx(4.0)
    assert result["mean"]["fvu"] == pytest.approx(
        np.mean([v["fvu"] for v in summary["eval"]["layers"].values()])
    )
    # --hook evaluates at one of them
    assert main(["eval", str(run), "--hook", "layers.1.resid_post", "--tokens", "256", "--no-splice",
                 "--json", str(tmp_path / "one.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "one.json").read_text())["hook"] == "layers.1.resid_post"


def test_multilayer_from_a_cache_of_every_layer(setup, tmp_path, capsys):
    root, _, text = setup
    cache = tmp_path / "cache"
    argv = ["cache", *_common(root, text), "--hook", "layers.*.resid_post", "--hook", "layers.0.mlp_out",
            "--tokens", "600", "--out", str(cache), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    train = ["train", "--arch", "multilayer", "--cache", str(cache), "--k", "2", "--expansion", "1",
             "--tokens", "600", "--batch-size", "60", "--progress", "false",
             "--eval-tokens", "0"]  # fmt: skip
    assert main([*train, "--out", str(tmp_path / "run")]) == 0  # default: every resid_post, not mlp_out
    sae = saekit.load(tmp_path / "run")
    assert sae.metadata["hooks"] == EVERY_LAYER and sae.cfg.n_layers == 3
    assert main([*train, "--hook", "layers.*.attn_out", "--out", str(tmp_path / "bad")]) == 2
    assert "no hook point of the cache matches" in capsys.readouterr().err


def test_hook_settings_that_cannot_work_are_clear_errors(setup, tmp_path, capsys):
    root, _, text = setup
    common = [*_common(root, text), "--tokens", "300", "--out", str(tmp_path / "r"), "--progress", "false"]
    assert main(["train", "--arch", "topk", "--hook", "layers.*.resid_post", *common]) == 2
    assert "reads one hook point" in capsys.readouterr().err
    assert main(["train", "--arch", "multilayer", "--n-layers", "2", *common]) == 2
    assert "n_layers is the number of hook points, 3" in capsys.readouterr().err
    assert main(["train", "--arch", "multilayer", "--batch-size", "2", "--k", "2", *common]) == 2
    assert "smaller than the 3 hook points" in capsys.readouterr().err


def test_own_training_rows_train_and_evaluate_without_a_model(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("an SAE with its own rows must not load a model")

    monkeypatch.setattr(saekit.models, "load_model", no_model)
    x, _ = synthetic_activations(2000, 16, 24, avg_active=2, seed=0)
    rows_file = tmp_path / "rows.npy"
    np.save(rows_file, x.numpy())
    run = tmp_path / "run"
    argv = ["train", "--arch", "test_own_rows", "--rows-file", str(rows_file), "--k", "2", "--expansion", "3",
            "--tokens", "25600", "--batch-size", "256", "--lr", "1e-2", "--warmup-steps", "5",
            "--progress", "false", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert "own training rows (2,000 × 16)" in capsys.readouterr().out
    assert not (run / "activations").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["steps"] == 100 and summary["hook"] is None
    assert summary["eval"]["l0"] <= 2.0 and summary["eval"]["fvu"] < 0.3
    result = json.loads((run / "eval.json").read_text())
    assert result["reconstruction"]["n_tokens"] == 2000 and result["splice"] is None
    sae = saekit.load(run)
    assert sae.metadata["training_rows"]["n_rows"] == 2000 and "hook" not in sae.metadata

    assert main(["eval", str(run), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["reconstruction"]["fvu"] == pytest.approx(result["reconstruction"]["fvu"])
