"""Data-parallel training (saekit.train.distributed): two CPU processes (gloo) train TopK and ReLU SAEs to the
weights single-process training reaches on the same global batches; a run killed on 2 ranks resumes on 1
and ends where the single-process run ends; BatchTopK's threshold buffer stays in step across ranks; the
cache reader's rank shares are exactly the single-process batches."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_train import B, D, M, make_data, source_of
from test_train import small_cfg as _small_cfg

from saekit.activations.reader import ShardedArray, ShardFile, shuffled_batches
from saekit.train import Trainer
from saekit.train.distributed import share

STEPS = 12
CRASH_AT = 7  # batches into the crashy run: after the checkpoint at step 4


def small_cfg(**kw):
    return _small_cfg(**{"total_tokens": B * STEPS, "checkpoint_every": 4, **kw})


def make_sae(arch: str):
    """TopK without AuxK: AuxK's loss is normalised by the residual's variance over the batch, which on
    each rank is its own share's (documented in saekit.train.distributed), so only with every term a mean
    over rows must the gradients match."""
    from saekit.sae import get_architecture

    cls = get_architecture(arch)
    torch.manual_seed(0)
    opts = {"topk": {"k": 4, "aux_coeff": 0.0}, "batchtopk": {"k": 4}}.get(arch, {})
    return cls(cls.config_class(d_in=D, width=M, **opts))


def _crashing(source, after: int):
    def crashy(skip):
        for i, batch in enumerate(source(skip)):
            if i == after:
                raise RuntimeError("simulated crash")
            yield batch

    return crashy


def _worker(rank: int, world: int, port: int, root: str, cli_argv: list[str]) -> None:
    """One rank: the same runs as the parent's single-process references, on this rank's shares, then
    `saekit train` as torchrun starts it (the environment as torchrun sets it; it ends the group)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    from saekit.train.distributed import from_env, shutdown

    dist = from_env()
    assert dist is not None and dist.world_size == world and dist.backend == "gloo"
    data = make_data()
    ranked = dist.shard_source(source_of(data))
    try:
        for arch in ("topk", "relu", "batchtopk"):
            Trainer(make_sae(arch), small_cfg(), Path(root) / arch, distributed=dist).fit(ranked)
        crashy = _crashing(ranked, CRASH_AT)
        try:
            Trainer(make_sae("topk"), small_cfg(), Path(root) / "crashy", distributed=dist).fit(crashy)
        except RuntimeError as e:
            assert "simulated crash" in str(e)
        else:
            raise AssertionError("the crashy run finished")
        diverged = make_sae("relu")  # the consistency check: a rank with other weights is caught
        with torch.no_grad():
            diverged.b_enc[0] += rank
        try:
            dist.check_same_weights(diverged)
        except RuntimeError as e:
            Path(root, f"diverged{rank}.txt").write_text(str(e))
        from saekit.cli import main

        assert main(cli_argv) == 0
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI = ["--tokens", "1024", "--batch-size", "128", "--warmup-steps", "2", "--progress", "false",
       "--checkpoint-every", "3", "--eval-tokens", "0", "--k", "4", "--aux-coeff", "0",
       "--expansion", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A 2000-token cache of layers.1.resid_post (d = 32) of a tiny random llama."""
    from saekit.cli import main
    from saekit.models.tiny import byte_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("dist-data")
    tiny_llama(n_layers=2, d_model=32).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    (root / "corpus.txt").write_text(
        "\n\n".join(f"Paragraph {i} is about feature {i * 7}." for i in range(300))
    )
    argv = ["cache", "--model", str(root / "model"), "--text", str(root / "corpus.txt"),
            "--context-len", "32", "--hook", "layers.1.resid_post", "--tokens", "2000",
            "--out", str(root / "cache"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return root / "cache"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_cache):
    """The runs of :func:`_worker` on 2 gloo processes."""
    root = tmp_path_factory.mktemp("dist")
    tests_dir = str(Path(__file__).parent)
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    cli_argv = ["train", "--cache", str(tiny_cache), *CLI, "--out", str(root / "cli")]
    mp.spawn(_worker, args=(2, _free_port(), str(root), cli_argv), nprocs=2, join=True)
    return root


def _sae_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["sae_state"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=2e-5), (
            f"{k}: max diff {(a[k].double() - b[k].double()).abs().max():.3g}"
        )


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_two_ranks_equal_one_process_on_the_same_global_batches(two_ranks, tmp_path, arch):
    reference = Trainer(make_sae(arch), small_cfg(), tmp_path / arch)
    summary = reference.fit(source_of(make_data()))
    ranked = json.loads((two_ranks / arch / "train_summary.json").read_text())
    assert ranked["steps"] == summary["steps"] == STEPS
    assert ranked["tokens"] == summary["tokens"] == STEPS * B  # counted over both ranks
    assert ranked["norm_scale"] == pytest.approx(summary["norm_scale"], rel=1e-6)  # gathered init sample
    _close(_sae_state(two_ranks / arch), {k: v for k, v in reference.sae.state_dict().items()})
    mine = torch.load(two_ranks / arch / "checkpoint.pt", weights_only=True)
    assert mine["world_size"] == 2
    assert mine["dead"]["tokens_seen"] == STEPS * B  # dead-latent statistics over both ranks' rows
    assert torch.equal(mine["dead"]["tokens_since_fire"], reference.dead.tokens_since_fire_M)
    ranked_log = [
        r for r in map(json.loads, (two_ranks / arch / "metrics.jsonl").open()) if r["kind"] == "train"
    ]
    single_log = [
        r for r in map(json.loads, (tmp_path / arch / "metrics.jsonl").open()) if r["kind"] == "train"
    ]
    assert [r["step"] for r in ranked_log] == [r["step"] for r in single_log]
    for a, b in zip(ranked_log, single_log, strict=True):  # the loss is the mean over ranks of mean losses
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert (two_ranks / arch / "sae" / "sae.safetensors").is_file()


def test_saekit_train_under_torchrun_matches_one_process(two_ranks, tiny_cache, tmp_path):
    from safetensors.torch import load_file

    from saekit.cli import main

    assert main(["train", "--cache", str(tiny_cache), *CLI, "--out", str(tmp_path / "one")]) == 0
    ranked, single = (
        load_file(str(d / "sae" / "sae.safetensors")) for d in (two_ranks / "cli", tmp_path / "one")
    )
    _close(ranked, single)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (two_ranks / "cli", tmp_path / "one")]
    assert summaries[0]["train"]["tokens"] == summaries[1]["train"]["tokens"] == 1024
    assert json.loads((two_ranks / "cli" / "run_config.json").read_text())["out"] == str(two_ranks / "cli")


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    reference = Trainer(make_sae("topk"), small_cfg(), tmp_path / "ref")
    reference.fit(source_of(make_data()))
    out = two_ranks / "crashy"
    assert not (out / "train_summary.json").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["counters"]
    assert saved["step"] == saved["batches_consumed"] == 4 and saved["tokens"] == 4 * B  # global terms
    skips: list[int] = []
    resumed = Trainer(make_sae("topk"), small_cfg(), out)  # one process, no torch.distributed
    summary = resumed.fit(source_of(make_data(), calls=skips))
    assert skips == [4] and summary["resumed_from_step"] == 4 and summary["tokens"] == STEPS * B
    _close(dict(resumed.sae.state_dict()), dict(reference.sae.state_dict()))


def test_batchtopk_threshold_is_averaged_across_ranks(two_ranks):
    """Each rank selects over its own batch, so the ranks' thresholds would drift apart; the run reaching
    its end means every checkpoint found both ranks' buffers identical (otherwise it raises)."""
    state = _sae_state(two_ranks / "batchtopk")
    assert state["threshold"].item() > 0
    assert json.loads((two_ranks / "batchtopk" / "train_summary.json").read_text())["steps"] == STEPS


def test_check_same_weights_names_a_diverged_tensor(two_ranks):
    for rank in (0, 1):
        message = (two_ranks / f"diverged{rank}.txt").read_text()
        assert message.startswith("the SAE's ['b_enc'] differ between ranks")


# -- the reader's rank shares (no processes needed) ----------------------------------------------------
def _array(tmp_path: Path, sizes: list[int], d: int = 3) -> ShardedArray:
    files, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"s{i}.npy"
        np.save(path, np.arange(start, start + n, dtype=np.float32)[:, None].repeat(d, 1))
        header = len(path.read_bytes()) - n * d * 4
        files.append(ShardFile(path, n, (d,), np.dtype(np.float32), header))
        start += n
    return ShardedArray(files, "float32")


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_union_is_the_single_process_batch(tmp_path, world):
    acts = _array(tmp_path, [70, 45, 90])
    opts = dict(seed=4, buffer_rows=64, block_rows=16, epochs=2, return_rows=True)
    for skip in (0, 5):
        single = list(shuffled_batches(acts, 25, skip_batches=skip, **opts))
        ranks = [list(shuffled_batches(acts, 25, skip_batches=skip, rank=r, world_size=world, **opts))
                 for r in range(world)]  # fmt: skip
        assert all(len(r) == len(single) for r in ranks)
        for j, (x, rows) in enumerate(single):
            n = rows.shape[0]  # the last batch of the 2 epochs is short
            assert torch.equal(torch.cat([r[j][1] for r in ranks]), rows)
            assert torch.equal(torch.cat([r[j][0] for r in ranks]), x)
            for r in range(world):
                lo, hi = share(25, r, world)
                assert ranks[r][j][1].shape[0] == max(0, min(hi, n) - min(lo, n))
    with pytest.raises(ValueError, match="rank must be in"):
        next(shuffled_batches(acts, 25, rank=2, world_size=2))


def test_share_splits_contiguously():
    for n, world in [(10, 3), (32, 2), (2, 4)]:
        bounds = [share(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
