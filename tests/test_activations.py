"""Tests for saekit.activations: extraction, the cache (round trip, resume, corruption), the shuffled reader,
the streaming shuffle buffer and the norm scale. Tiny random models, the byte tokenizer and temp dirs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import saekit.activations.extract as extract_mod
from saekit.activations import (
    CacheError,
    NormTracker,
    ShuffleBuffer,
    estimate_norm_scale,
    iter_activations,
    iter_source_activations,
    open_cache,
    write_cache,
)
from saekit.models import LoadedModel
from saekit.models.tiny import byte_tokenizer, tiny_llama

HOOKS = ["layers.1.resid_post", "layers.2.resid_post"]
BOS = 0


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(tiny_llama(n_layers=4, d_model=32), byte_tokenizer(), "tiny-llama", "test", "0" * 16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A jsonl file of 300 pseudo-random documents (deterministic)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "auto", "encoder", "token", "layer", "the", "of"]
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with open(path, "w") as fh:
        for _ in range(300):
            doc = " ".join(rng.choice(words, size=rng.integers(5, 40)))
            fh.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def _contexts(n: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, 259, (n, T), generator=g)
    ctx[:, 0] = BOS
    return list(ctx)


CACHE_ARGS = dict(n_tokens=3000, context_len=64, batch_size=4, shard_rows=700, split="all", progress=False)


# ---------------------------------------------------------------- extraction


def test_extraction_matches_hidden_states_and_drops_bos(loaded):
    contexts = _contexts(10, 16)
    batches = list(iter_activations(loaded, None, contexts, HOOKS, batch_size=4, outlier_factor=None))
    assert [b.n_contexts for b in batches] == [4, 4, 2]
    with torch.no_grad():
        hs = loaded.model(torch.stack(contexts), output_hidden_states=True).hidden_states
    for b in batches:
        assert (b.positions != 0).all() and (b.tokens != BOS).all()
        assert b.excluded == {"special": b.n_contexts, "outlier": 0}
        assert len(b) == b.n_contexts * 15
        for i, h in enumerate(HOOKS):  # hidden_states[i + 2] is the output of layer i + 1
            ref = hs[i + 2][b.context_ids, b.positions]
            torch.testing.assert_close(b.acts[h], ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(b.tokens, torch.stack(contexts)[b.context_ids, b.positions])
    keep_all = next(iter_activations(loaded, None, contexts, HOOKS, batch_size=4, exclude_special=False))
    assert len(keep_all) == 4 * 16


def test_outliers_at_any_hook_are_dropped_from_every_hook(loaded, monkeypatch):
    real = extract_mod.forward_to_hooks
    spikes = {(0, 3), (1, 7), (2, 5)}  # (context, position) made 1000x larger, at the second hook only

    def spiked(model, ids, hooks, attention_mask=None):
        out = real(model, ids, hooks)
        for c, p in spikes:
            out[HOOKS[1]][c, p] *= 1000.0
        return out

    monkeypatch.setattr(extract_mod, "forward_to_hooks", spiked)
    contexts = _contexts(4, 16)
    (b,) = iter_activations(loaded, None, contexts, HOOKS, batch_size=4, outlier_factor=10.0)
    kept = set(zip(b.context_ids.tolist(), b.positions.tolist(), strict=True))
    assert not spikes & kept and len(kept) == 4 * 15 - 3
    assert b.excluded == {"special": 4, "outlier": 3}
    assert b.acts[HOOKS[0]].shape[0] == b.acts[HOOKS[1]].shape[0] == len(b)
    (b_all,) = iter_activations(loaded, None, contexts, HOOKS, batch_size=4, outlier_factor=None)
    assert b_all.excluded["outlier"] == 0 and len(b_all) == 60


def test_norm_tracker_median_and_state_round_trip():
    x = torch.tensor(np.random.default_rng(0).lognormal(np.log(170.0), 0.5, size=20_001), dtype=torch.float32)
    tr = NormTracker(["h"])
    tr.update("h", x[:10_000])
    tr.update("h", torch.cat([x[10_000:], torch.tensor([22_000.0] * 50)]))
    assert tr.median("h") == pytest.approx(float(x.median()), rel=0.03)
    tr2 = NormTracker(["h"])
    tr2.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    assert tr2.median("h") == tr.median("h")
    assert np.isnan(NormTracker(["h"]).median("h"))


def test_batch_head_keeps_counts_exact(loaded):
    (b,) = iter_activations(loaded, None, _contexts(4, 16), HOOKS, batch_size=4, outlier_factor=None)
    h = b.head(20)  # 15 rows of context 0, 5 of context 1
    assert len(h) == 20 and h.acts[HOOKS[0]].shape == (20, 32)
    assert h.n_positions == 16 + 6 and h.excluded["special"] == 2
    assert torch.equal(h.context_ids, b.context_ids[:20])


def test_bad_extraction_arguments(loaded):
    with pytest.raises(ValueError, match="outlier_factor"):
        next(iter_activations(loaded, None, _contexts(2, 8), HOOKS, batch_size=2, outlier_factor=0.5))
    with pytest.raises(ValueError, match="tokenizer"):
        next(iter_activations(loaded.model, None, _contexts(2, 8), HOOKS, batch_size=2))
    with pytest.raises(ValueError, match="one length"):
        next(
            iter_activations(
                loaded, None, [torch.zeros(8).long(), torch.zeros(9).long()], HOOKS, batch_size=2
            )
        )


@pytest.mark.smollm2
def test_smollm2_attention_sinks_are_excluded_at_the_default_factor():
    """The real case: SmolLM2's big sinks (position 1, after BOS) go, ordinary tokens stay."""
    from saekit.models import ModelUnavailableError, load_model

    try:
        lm = load_model("smollm2")
    except ModelUnavailableError as e:
        pytest.skip(str(e))
    hook = "layers.12.resid_post"
    stream = iter_source_activations(lm, [hook], source="stdlib", context_len=128, batch_size=16)
    batches = list(itertools.islice(stream, 6))  # 96 contexts
    reasons = torch.cat([b.reasons_BT for b in batches])
    outlier_pos = torch.nonzero(reasons == extract_mod.OUTLIER)[:, 1]
    assert len(outlier_pos) >= 1 and (outlier_pos == 1).all(), outlier_pos
    norms = torch.cat([b.acts[hook].norm(dim=1) for b in batches])
    assert norms.max() < 15 * norms.median()  # the big sinks (up to ~100x here) are gone
    assert (reasons[:, 0] == extract_mod.SPECIAL).all()  # BOS


# ---------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def cache_dir(loaded, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    write_cache(out, loaded, HOOKS, source=corpus, **CACHE_ARGS)
    return out


def test_cache_round_trip_equals_direct_extraction(loaded, corpus, cache_dir):
    cache = open_cache(cache_dir, verify="full")
    m = cache.manifest
    assert cache.n_tokens == 3000 and cache.hooks == HOOKS and cache.widths == {h: 32 for h in HOOKS}
    assert m["complete"] and len(m["shards"]) > 3 and sum(s["rows"] for s in m["shards"]) == 3000
    assert m["model"] == {"name": "tiny-llama", "source": "test", "file_hash": "0" * 16}
    assert m["settings"]["source_description"]["kind"] == "file"
    assert m["excluded"]["special"] >= m["contexts_consumed"]  # at least the BOS of every context
    assert m["positions_seen"] == 3000 + sum(m["excluded"].values())
    stream = iter_source_activations(loaded, HOOKS, source=corpus, split="all", context_len=64, batch_size=4)
    direct = list(itertools.islice(stream, m["contexts_consumed"] // 4))
    for h in HOOKS:
        ref = torch.cat([b.acts[h] for b in direct])[:3000].numpy()
        np.testing.assert_array_equal(cache.acts(h)[:], ref)
        assert cache.acts(h).shape == (3000, 32)
    np.testing.assert_array_equal(cache.tokens[:], torch.cat([b.tokens for b in direct])[:3000].numpy())
    np.testing.assert_array_equal(cache.positions[:], torch.cat([b.positions for b in direct])[:3000].numpy())
    ctx = cache.context_ids[:]
    assert (np.diff(ctx) >= 0).all() and ctx[-1] < m["contexts_consumed"]
    text = cache.describe()
    assert "tiny-llama" in text and "3,000 written" in text and HOOKS[1] in text


def test_sharded_array_indexing_across_shards(cache_dir):
    cache = open_cache(cache_dir)
    acts = cache.acts(HOOKS[0])
    full = np.concatenate([acts.shard(i) for i in range(len(acts.files))])  # small: fine in a test
    np.testing.assert_array_equal(acts[650:1500], full[650:1500])  # spans shard boundaries
    np.testing.assert_array_equal(acts[-1], full[-1])
    idx = np.array([2999, 0, 701, 701, 1400, 5])
    np.testing.assert_array_equal(acts[idx], full[idx])
    np.testing.assert_array_equal(acts[10:200:7], full[10:200:7])
    assert acts[5:5].shape == (0, 32) and len(acts) == 3000
    with pytest.raises(IndexError):
        acts[3000]


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_caches_read_as_float32(loaded, corpus, cache_dir, tmp_path, dtype, tol):
    args = dict(CACHE_ARGS, n_tokens=800)
    cache = write_cache(tmp_path / dtype, loaded, HOOKS, source=corpus, dtype=dtype, **args)
    ref = open_cache(cache_dir).acts(HOOKS[1])[:800]
    got = cache.acts(HOOKS[1])[:]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    x = next(cache.batches(HOOKS[1], 64, return_rows=True))
    np.testing.assert_array_equal(x[0].numpy(), got[x[1].numpy()])


def test_killed_run_resumes_to_an_identical_cache(loaded, corpus, cache_dir, tmp_path, monkeypatch):
    real = extract_mod.forward_to_hooks
    calls = {"n": 0}

    def dies_after_6(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(extract_mod, "forward_to_hooks", dies_after_6)
    with pytest.raises(KeyboardInterrupt):
        write_cache(out, loaded, HOOKS, source=corpus, **CACHE_ARGS)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and 0 < len(partial["shards"]) < 5
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    assert open_cache(out, allow_incomplete=True).n_tokens == partial["tokens_written"]
    # killed between renaming a shard into place and recording it, and while writing the next one:
    (out / f"shard_{len(partial['shards']):05d}").mkdir()
    (out / f"shard_{len(partial['shards']):05d}" / "tokens.npy").write_bytes(b"junk")
    (out / f"shard_{len(partial['shards']) + 1:05d}.tmp").mkdir()
    calls["n"] = -(10**9)  # the resumed run may call freely; count its forwards
    write_cache(out, loaded, HOOKS, source=corpus, **CACHE_ARGS)
    resumed, whole = open_cache(out, verify="full"), open_cache(cache_dir, verify="full")
    n_batches_total = whole.manifest["contexts_consumed"] // 4 + (whole.manifest["contexts_consumed"] % 4 > 0)
    assert calls["n"] + 10**9 == n_batches_total - partial["contexts_consumed"] // 4  # skipped, not re-run
    for key in ("shards", "excluded", "positions_seen", "contexts_consumed", "norm_state", "tokens_written"):
        assert resumed.manifest[key] == whole.manifest[key], key
    for h in HOOKS:
        np.testing.assert_array_equal(resumed.acts(h)[:], whole.acts(h)[:])
    np.testing.assert_array_equal(resumed.context_ids[:], whole.context_ids[:])
    calls["n"] = 0
    write_cache(out, loaded, HOOKS, source=corpus, **CACHE_ARGS)  # complete: nothing is recomputed
    assert calls["n"] == 0


def test_resume_with_other_arguments_is_refused(loaded, corpus, cache_dir, tmp_path):
    with pytest.raises(CacheError, match="context_len: cache has 64, asked 32"):
        write_cache(cache_dir, loaded, HOOKS, source=corpus, **dict(CACHE_ARGS, context_len=32))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        write_cache(tmp_path / "junk", loaded, HOOKS, source=corpus, **CACHE_ARGS)
    with pytest.raises(ValueError, match="dtype"):
        write_cache(tmp_path / "x", loaded, HOOKS, source=corpus, dtype="int8", **CACHE_ARGS)


def test_overwrite_replaces_a_different_cache(loaded, corpus, tmp_path):
    out = tmp_path / "c"
    write_cache(out, loaded, HOOKS[:1], source=corpus, **dict(CACHE_ARGS, n_tokens=300))
    cache = write_cache(
        out, loaded, HOOKS[1:], source=corpus, overwrite=True, **dict(CACHE_ARGS, n_tokens=200)
    )
    assert cache.hooks == HOOKS[1:] and cache.n_tokens == 200 and len(cache.manifest["shards"]) == 1


def test_source_running_out_is_warned_and_recorded(loaded, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(12)))
    with pytest.warns(UserWarning, match="ran out"):
        cache = write_cache(tmp_path / "c", loaded, HOOKS[:1], source=str(small), **CACHE_ARGS)
    assert cache.manifest["source_exhausted"] and cache.manifest["complete"] and 0 < cache.n_tokens < 3000


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _corrupt_cases():
    def no_manifest(d):
        (d / "manifest.json").unlink()

    def missing_file(d):
        (d / "shard_00001" / "layers.1.resid_post.npy").unlink()

    def truncated(d):
        p = d / "shard_00002" / "positions.npy"
        p.write_bytes(p.read_bytes()[:-40])

    def bad_rows(d):
        m = json.loads((d / "manifest.json").read_text())
        m["shards"][0]["rows"] -= 1
        (d / "manifest.json").write_text(json.dumps(m))

    def future_version(d):
        m = json.loads((d / "manifest.json").read_text())
        m["format_version"] = 99
        (d / "manifest.json").write_text(json.dumps(m))

    def garbage_manifest(d):
        (d / "manifest.json").write_text("{not json")

    return [
        (no_manifest, "size", r"manifest.json: missing"),
        (missing_file, "size", r"shard_00001/layers.1.resid_post.npy: missing shard file"),
        (truncated, "size", r"shard_00002/positions.npy: .*(bytes|rows|readable)"),
        (bad_rows, "none", r"shard_00000/\S+\.npy: holds (\d+) rows, the manifest says (?!\1)"),
        (future_version, "size", r"format version 99 is not supported"),
        (garbage_manifest, "size", r"manifest.json: not valid JSON"),
    ]


@pytest.mark.parametrize(
    "corrupt, verify, message", _corrupt_cases(), ids=lambda c: getattr(c, "__name__", "")
)
def test_corrupt_caches_raise_named_errors(cache_dir, tmp_path, corrupt, verify, message):
    d = _copy(cache_dir, tmp_path / "c")
    corrupt(d)
    with pytest.raises(CacheError, match=message):
        open_cache(d, verify=verify)


def test_checksum_mismatch_caught_by_full_verify_only(cache_dir, tmp_path):
    d = _copy(cache_dir, tmp_path / "c")
    p = d / "shard_00003" / "layers.2.resid_post.npy"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    open_cache(d, verify="size")
    with pytest.raises(CacheError, match=r"shard_00003/layers.2.resid_post.npy: sha256 checksum mismatch"):
        open_cache(d, verify="full")


def test_unknown_hook_is_a_named_error(cache_dir):
    with pytest.raises(CacheError, match=r"hook 'layers.9.resid_post' is not in the cache .* holds \["):
        open_cache(cache_dir).acts("layers.9.resid_post")


# ---------------------------------------------------------------- shuffled reader


def test_reader_each_row_once_per_epoch_and_deterministic(cache_dir):
    cache = open_cache(cache_dir)
    kw = dict(seed=3, epochs=2, buffer_rows=600, block_rows=128, return_rows=True)
    out = list(cache.batches(HOOKS[0], 256, **kw))
    rows = torch.cat([r for _, r in out]).numpy()
    x = torch.cat([b for b, _ in out]).numpy()
    assert len(rows) == 6000 and [len(r) for _, r in out][:-1] == [256] * (len(out) - 1)
    assert sorted(rows[:3000]) == list(range(3000)) and sorted(rows[3000:]) == list(range(3000))
    assert not (rows[:3000] == rows[3000:]).all()  # each epoch has its own order
    np.testing.assert_array_equal(x, cache.acts(HOOKS[0])[rows])
    first_shards = np.searchsorted(cache.acts(HOOKS[0]).offsets, rows[:256], side="right") - 1
    assert len(set(first_shards)) >= 2  # a batch mixes shards
    again = list(cache.batches(HOOKS[0], 256, **kw))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(out, again, strict=True))
    other = next(cache.batches(HOOKS[0], 256, **dict(kw, seed=4)))
    assert not torch.equal(other[1], out[0][1])


@pytest.mark.parametrize("skip", [0, 1, 5, 11, 12, 20])
def test_reader_skip_batches_resumes_exactly(cache_dir, skip):
    cache = open_cache(cache_dir)
    kw = dict(seed=1, buffer_rows=500, block_rows=100, return_rows=True)
    full = list(itertools.islice(cache.batches(HOOKS[1], 256, **kw), 30))  # crosses epochs
    resumed = list(itertools.islice(cache.batches(HOOKS[1], 256, skip_batches=skip, **kw), 30 - skip))
    assert all(
        torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(full[skip:], resumed, strict=True)
    )
    assert len(resumed) == 30 - skip


def test_reader_finite_epochs_end_and_drop_last(cache_dir):
    cache = open_cache(cache_dir)
    sizes = [len(b) for b in cache.batches(HOOKS[0], 1024, epochs=1)]
    assert sizes == [1024, 1024, 952]
    assert [len(b) for b in cache.batches(HOOKS[0], 1024, epochs=1, drop_last=True)] == [1024, 1024]
    assert list(cache.batches(HOOKS[0], 1024, epochs=1, skip_batches=3)) == []


# ---------------------------------------------------------------- shuffle buffer


def _row_chunks(n: int, d: int, chunk: int):
    for start in range(0, n, chunk):
        x = torch.randn(min(chunk, n - start), d)
        x[:, 0] = torch.arange(start, min(n, start + chunk)).float()  # row-id column
        yield x


def test_shuffle_buffer_emits_each_row_once_shuffled_and_seeded():
    buf = ShuffleBuffer(capacity=512, batch_size=64, seed=7)
    out = list(buf(_row_chunks(3000, 4, 100)))
    ids = torch.cat(out)[:, 0].long()
    assert sorted(ids.tolist()) == list(range(3000))
    assert [len(b) for b in out[:-1]] == [64] * (len(out) - 1) and len(out[-1]) == 3000 % 64
    assert ids[:64].float().std() > 50  # not in arrival order
    again = torch.cat(list(ShuffleBuffer(512, 64, seed=7)(_row_chunks(3000, 4, 100))))[:, 0]
    assert torch.equal(again.long(), ids)
    assert len(list(ShuffleBuffer(512, 64, seed=7, drop_last=True)(_row_chunks(3000, 4, 100)))) == 3000 // 64


def test_shuffle_buffer_waits_until_filled_and_bounds_memory():
    pulled = []

    def source():
        for i, x in enumerate(_row_chunks(2000, 4, 50)):
            pulled.append(i)
            yield x

    it = ShuffleBuffer(capacity=400, batch_size=50)(source())
    first = next(it)
    assert len(pulled) == 8  # 400 rows arrived before the first batch
    assert first[:, 0].max() < 400
    with pytest.raises(ValueError, match="at least 2"):
        ShuffleBuffer(capacity=60, batch_size=50)
    with pytest.raises(ValueError, match="width"):
        list(ShuffleBuffer(400, 50)([torch.zeros(10, 4), torch.zeros(10, 5)]))


# ---------------------------------------------------------------- norm scale


def test_norm_scale_on_known_data():
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(20_000, 16, generator=g)
    s = estimate_norm_scale(x.split(1000), d=16)
    assert s == pytest.approx(1 / 3.0, rel=0.02)
    exact = float(torch.sqrt(16 / x.double().square().sum(1).mean()))
    assert s == pytest.approx(exact, rel=1e-9)
    rows = torch.ones(10, 4)  # ||x||^2 = 4 = d
    assert estimate_norm_scale([rows], d=4) == pytest.approx(1.0)
    huge_later = [rows, 1e6 * rows]
    assert estimate_norm_scale(huge_later, d=4, max_rows=10) == pytest.approx(1.0)  # max_rows respected


def test_norm_scale_rejects_non_finite_and_bad_input():
    x = torch.randn(100, 8)
    x[3, 2] = float("nan")
    x[50] = float("inf")
    x[51, 0] = float("-inf")
    with pytest.raises(ValueError, match="3 of 100 activation rows contain NaN or Inf"):
        estimate_norm_scale([x], d=8)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        estimate_norm_scale([torch.zeros(4, 7)], d=8)
    with pytest.raises(ValueError, match="no activation rows"):
        estimate_norm_scale([], d=8)


# ---------------------------------------------------------------- bounded memory


READ_ALL = textwrap.dedent(
    """
    import sys
    from saekit.activations import open_cache

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # MB

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    cache = open_cache(sys.argv[1])
    it = cache.batches(sys.argv[2], 1024, epochs=1, buffer_rows=8192, block_rows=1024)
    reset_peak()
    base = status("VmRSS")
    n = sum(len(b) for b in it)
    growth = status("VmHWM") - base
    reset_peak()
    base = status("VmRSS")
    whole = cache.acts(sys.argv[2])[:]  # control: what loading everything costs
    control = status("VmHWM") - base
    print(n, growth, control)
    """
)


def test_reading_a_large_cache_keeps_memory_bounded(tmp_path):
    """~200 MB of activations read through a 32 MB buffer: peak RSS must grow by far less than the cache."""
    rng = np.random.default_rng(0)
    path = tmp_path / "text.jsonl"
    with open(path, "w") as fh:
        for _ in range(400):
            fh.write(json.dumps({"text": "".join(rng.choice(list("abcdefgh "), size=128))}) + "\n")
    wide = LoadedModel(tiny_llama(n_layers=1, d_model=1024), byte_tokenizer(), "wide", "test", None)
    hook = "layers.0.resid_pre"  # the embeddings: the forward stops before any block runs
    n = 50_000
    cache = write_cache(
        tmp_path / "big", wide, [hook], source=str(path), n_tokens=n, context_len=128, batch_size=64,
        shard_rows=8_192, split="all", progress=False,
    )  # fmt: skip
    size_mb = cache.nbytes() / 2**20
    assert size_mb > 190
    res = subprocess.run(
        [sys.executable, "-c", READ_ALL, str(tmp_path / "big"), hook],
        capture_output=True,
        text=True,
        check=True,
    )
    rows, growth_mb, control_mb = res.stdout.split()
    print(f"\nread {rows} rows of a {size_mb:.0f} MB cache; peak RSS grew {float(growth_mb):.1f} MB "
          f"(loading it whole: {float(control_mb):.0f} MB)")  # fmt: skip
    assert int(rows) == n
    assert float(control_mb) > 0.9 * size_mb  # the measurement does see memory use
    assert float(growth_mb) < 64, f"peak RSS grew {growth_mb} MB reading a {size_mb:.0f} MB cache"
