"""The speed benchmark's harness (benchmarks/_common.py, benchmarks/train_speed.py): the pieces every
library's numbers pass through, pinned against direct computations. The peer workers themselves need the
benchmark environment (SAELens, sparsify) and are exercised by running the benchmark, not here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common  # noqa: E402
import train_speed  # noqa: E402

from saekit.eval.metrics import ReconstructionStats  # noqa: E402
from saekit.train.schedules import lr_factor as saekit_lr_factor  # noqa: E402


def test_npy_rows_reads_the_same_rows_as_np_load(tmp_path):
    x = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rows = _common.NpyRows(tmp_path / "x.npy")
    assert rows.shape == (37, 5) and len(rows) == 37
    np.testing.assert_array_equal(rows.read(3, 7), x[3:10])
    blocks = list(rows.batches(8))  # 4 full batches; the last 5 rows are never used
    assert len(blocks) == 4
    np.testing.assert_array_equal(np.concatenate(blocks), x[:32])
    np.testing.assert_array_equal(next(iter(rows.batches(8, start_batch=2))), x[16:24])
    it = rows.batches(8, start_batch=3, cycle=True)
    np.testing.assert_array_equal(next(it), x[24:32])
    np.testing.assert_array_equal(next(it), x[0:8])  # cycling restarts at the first batch


def test_npy_rows_rejects_what_it_cannot_read(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        _common.NpyRows(tmp_path / "v.npy")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError, match="Fortran"):
        _common.NpyRows(tmp_path / "f.npy")
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    rows = _common.NpyRows(tmp_path / "x.npy")
    with pytest.raises(IndexError, match="outside"):
        rows.read(2, 3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(rows.batches(5))


def test_outputs_round_trip_dense_and_topk_codes(tmp_path):
    rng = np.random.default_rng(1)
    n, d, m = 10, 3, 12
    f_dense = rng.random((n, m)).astype(np.float32) * (rng.random((n, m)) < 0.3)
    f_dense[4] = 0  # a row with no active latent
    x_hat = rng.standard_normal((n, d)).astype(np.float32)
    w = _common.OutputWriter(tmp_path / "dense", m)
    w.add_dense(x_hat[:6], f_dense[:6])
    w.add_dense(x_hat[6:], f_dense[6:])
    w.close()
    got = list(_common.iter_outputs(tmp_path / "dense", m, chunk=4))
    assert [sl for sl, _, _ in got] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    np.testing.assert_array_equal(torch.cat([f for _, _, f in got]).numpy(), f_dense)
    np.testing.assert_array_equal(torch.cat([xh for _, xh, _ in got]).numpy(), x_hat)

    # top-k: unsorted indices, a selected latent whose value is 0 (dropped), the same dense code back
    idx = np.array([[5, 1, 9], [0, 11, 3]])
    val = np.array([[0.5, 2.0, 0.0], [1.0, 3.0, 4.0]], np.float32)
    w = _common.OutputWriter(tmp_path / "topk", m)
    w.add_topk(x_hat[:2], idx, val)
    w.close()
    expect = np.zeros((2, m), np.float32)
    np.put_along_axis(expect, idx, val, axis=1)
    ((_, _, f),) = _common.iter_outputs(tmp_path / "topk", m)
    np.testing.assert_array_equal(f.numpy(), expect)
    assert np.load(tmp_path / "topk" / "f_indices.npy").shape == (5,)  # the zero was not stored
    with pytest.raises(ValueError, match="twice"):
        _common.OutputWriter(tmp_path / "bad", m).add_topk(x_hat[:1], np.array([[2, 2]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="outside"):
        _common.OutputWriter(tmp_path / "bad", m).add_topk(x_hat[:1], np.array([[12]]), np.ones((1, 1)))


@pytest.mark.parametrize("total,warmup", [(390, 20), (32, 2), (7, 0), (5, 9)])
def test_peer_schedule_is_saekits(total, warmup):
    for step in range(total):
        expect = saekit_lr_factor(
            step, total_steps=total, warmup_steps=warmup, decay="linear", decay_start_fraction=0.8
        )
        assert _common.lr_factor(step, total, warmup) == pytest.approx(expect, abs=1e-15)


def test_peak_rss_sees_a_new_allocation():
    before = _common.peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page touched
    assert _common.rss_now_mb() > 0
    assert _common.peak_rss_mb() >= max(before, _common.rss_now_mb()) - 1
    assert _common.peak_rss_mb() >= 64
    del block


def _result(run, lib, tps, fvu, rss):
    return {"run": run, "library": lib, "tokens_per_s": tps, "heldout": {"fvu": fvu}, "peak_rss_mb": rss}


def test_verdicts_compare_with_the_faster_peer_and_every_peers_fvu():
    results = [
        _result("topk-8x", "saekit", 1000.0, 0.50, 300),
        _result("topk-8x", "SAELens", 300.0, 0.60, 900),
        _result("topk-8x", "sparsify", 450.0, 0.49, 800),
        _result("relu-8x", "saekit", 100.0, 0.3, 300),
        _result("relu-8x", "SAELens", 120.0, 0.3, 250),
    ]
    bars = train_speed.verdicts(results)
    assert "meets: topk-8x tokens/s >= 2x the faster peer (sparsify): 2.22x" in bars
    assert any(b.startswith("MISSES: topk-8x held-out FVU") for b in bars)  # sparsify's 0.49 is lower
    assert any(b.startswith("meets: topk-8x peak RSS") for b in bars)
    assert "MISSES: relu-8x not slower than SAELens: 0.83x" in bars
    assert any(b.startswith("MISSES: relu-8x peak RSS") for b in bars)
    rows = train_speed.ratio_rows(results)
    assert rows[1]["ratio"] == pytest.approx(1000 / 300) and rows[0]["ratio"] is None


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_saekit_worker_outputs_give_the_metrics_of_the_saved_sae(tmp_path, arch):
    rng = np.random.default_rng(2)
    d, width, n = 16, 64, 1024
    np.save(tmp_path / "train.npy", (rng.standard_normal((n, d)) * 5 + 3).astype(np.float32))
    x_eval = (rng.standard_normal((300, d)) * 5 + 3).astype(np.float32)
    np.save(tmp_path / "heldout.npy", x_eval)
    out = tmp_path / "out"
    spec = {
        "train": str(tmp_path / "train.npy"), "heldout": str(tmp_path / "heldout.npy"), "out": str(out),
        "arch": arch, "width": width, "k": 4, "l1": 1.0, "steps": 6, "batch_size": 128, "lr": 1e-3,
        "betas": [0.9, 0.999], "warmup_steps": 1, "dead_tokens": 256, "seed": 0,
        "threads": torch.get_num_threads(), "gemm_seconds": 0.01,
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    train_speed.saekit_worker(str(tmp_path / "spec.json"))
    result = json.loads((out / "result.json").read_text())
    assert (result["tokens"], result["steps"], result["arch"]) == (768, 6, arch)
    assert result["gemm_seconds"] > 0 and result["step_over_gemm"] > 0
    assert result["peak_rss_mb"] >= result["rss_before_train_mb"] > 0
    # the scale the orchestrator hands the peers is the one saekit's trainer used
    assert train_speed.input_scale(np.load(tmp_path / "train.npy")[:768]) == pytest.approx(
        result["norm_scale"], rel=1e-6
    )

    got = train_speed.heldout_metrics(out, x_eval, width)
    import saekit

    sae = saekit.load(out / "run" / "sae").eval()
    stats = ReconstructionStats()
    with torch.no_grad():
        x = torch.from_numpy(x_eval)
        f = sae.encode(x)
        stats.update(x, sae.decode(f), f)
    want = stats.result()
    for key in ("fvu", "l0", "dead_fraction", "cosine"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    if arch == "topk":
        assert got["l0"] <= 4
