"""Several SAEs from one pass (saekit.train.multi, `saekit train-many`): each SAE trained in lockstep ends bit
for bit as when trained alone on the same batches (own RNG stream, own schedule, own token budget), a
killed pass resumes exactly with the shared source skipping once, impossible combinations are refused, and
the command line (cache and stream) gives the SAEs `saekit train` gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import B, D, M, TinyConfig, TinySAE, _assert_identical, _final_state, _losses, make_data
from test_train import small_cfg as _small_cfg

from saekit.cli import main
from saekit.jobs import ExtractConfig, streaming_batch_source
from saekit.models import LoadedModel
from saekit.models.tiny import byte_tokenizer, tiny_llama
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.train import Trainer
from saekit.train.multi import MultiTrainer, stream_source
from saekit.train_job import parse_sae_spec


def small_cfg(**kw):
    return _small_cfg(**{"total_tokens": B * 14, "checkpoint_every": 4, **kw})


def _data() -> dict[str, torch.Tensor]:
    return {"a": make_data(seed=1), "b": make_data(seed=2, scale=5.0)}


def dict_source(data, *, crash_after=None, calls=None):
    """{key: batch} dicts, cycling over each key's rows, like test_train.source_of."""
    n = next(iter(data.values())).shape[0] // B

    def source(skip):
        if calls is not None:
            calls.append(skip)
        for count, i in enumerate(range(skip, 10**9)):
            if crash_after is not None and count == crash_after:
                raise RuntimeError("simulated crash")
            yield {k: v[(i % n) * B : (i % n + 1) * B].clone() for k, v in data.items()}

    return source


def _single(data, key):
    return lambda skip: (b[key] for b in dict_source(data)(skip))


def _topk(seed=0):
    torch.manual_seed(seed)
    return TopKSAE(TopKConfig(d_in=D, width=M, k=4))


def _specs(root):
    """(key, make SAE, config, out dir): TinySAE draws random numbers in training (input noise), so its
    result depends on its RNG stream; one SAE stops after fewer tokens; two read the same key."""
    return [
        ("a", lambda: TinySAE(TinyConfig(d_in=D, width=M), seed=0), small_cfg(), root / "tiny-a"),
        ("a", lambda: TinySAE(TinyConfig(d_in=D, width=M), seed=1), small_cfg(lr=1e-3), root / "tiny-a2"),
        ("b", _topk, small_cfg(total_tokens=B * 9, checkpoint_every=3), root / "topk-b"),
    ]  # fmt: skip


def test_lockstep_equals_training_each_alone(tmp_path):
    data = _data()
    refs = []
    for key, make, cfg, out in _specs(tmp_path / "ref"):
        trainer = Trainer(make(), cfg, out)
        trainer.fit(_single(data, key))
        refs.append(trainer)
    calls = []
    multi = [(k, Trainer(make(), cfg, out)) for k, make, cfg, out in _specs(tmp_path / "multi")]
    summaries = MultiTrainer(multi).fit(dict_source(data, calls=calls))
    assert calls == [0]  # one pass
    assert [s["steps"] for s in summaries] == [14, 14, 9]
    for ref, (_, trainer) in zip(refs, multi, strict=True):
        _assert_identical(_final_state(ref), _final_state(trainer))
        assert _losses(trainer.out_dir) == _losses(ref.out_dir)
        assert (trainer.out_dir / "sae" / "sae.safetensors").is_file()
        assert (trainer.out_dir / "train_summary.json").is_file()


def test_killed_pass_resumes_bit_identical_skipping_once(tmp_path):
    data = _data()
    reference = [(k, Trainer(make(), cfg, out)) for k, make, cfg, out in _specs(tmp_path / "ref")]
    MultiTrainer(reference).fit(dict_source(data))
    out = tmp_path / "crashy"
    calls: list[int] = []
    # checkpoints: topk every 3 and at its end (9), tiny every 4. Crash during the initial sample, then
    # after batches 5 (resume at 4), 8 (at 8) and 10 (at 9: topk finished, the tiny SAEs not)
    for crash_after in (1, 5, 4, 2):
        pass_ = [(k, Trainer(make(), cfg, o)) for k, make, cfg, o in _specs(out)]
        with pytest.raises(RuntimeError, match="simulated crash"):
            MultiTrainer(pass_).fit(dict_source(data, crash_after=crash_after, calls=calls))
    ckpts = [torch.load(o / "checkpoint.pt", weights_only=True)["counters"] for *_, o in _specs(out)]
    assert len({c["batches_consumed"] for c in ckpts}) == 1  # all checkpointed at the same batch
    resumed = [(k, Trainer(make(), cfg, o)) for k, make, cfg, o in _specs(out)]
    summaries = MultiTrainer(resumed).fit(dict_source(data, calls=calls))
    assert calls[-1] == summaries[0]["resumed_from_step"] > 0  # the shared source skipped once
    for (_, ref), (_, trainer) in zip(reference, resumed, strict=True):
        _assert_identical(_final_state(ref), _final_state(trainer))
        assert _losses(trainer.out_dir) == _losses(ref.out_dir)


def test_refuses_what_one_pass_cannot_train(tmp_path):
    def tiny():
        return TinySAE(TinyConfig(d_in=D, width=M))

    with pytest.raises(ValueError, match="batch sizes differ"):
        MultiTrainer([("a", Trainer(tiny(), small_cfg(), tmp_path / "x")),
                      ("a", Trainer(tiny(), small_cfg(batch_size=16), tmp_path / "y"))])  # fmt: skip
    with pytest.raises(ValueError, match="same out_dir"):
        MultiTrainer([("a", Trainer(tiny(), small_cfg(), tmp_path / "x")),
                      ("b", Trainer(tiny(), small_cfg(), tmp_path / "x"))])  # fmt: skip
    data = _data()
    crashing = dict_source(data, crash_after=10)
    with pytest.raises(RuntimeError, match="simulated"):  # leaves a checkpoint at batch 8
        Trainer(tiny(), small_cfg(), tmp_path / "half").fit(lambda skip: (b["a"] for b in crashing(skip)))
    pair = [("a", Trainer(tiny(), small_cfg(), tmp_path / "half")),
            ("a", Trainer(tiny(), small_cfg(), tmp_path / "fresh"))]  # fmt: skip
    with pytest.raises(ValueError, match="resume from different batches"):
        MultiTrainer(pair).fit(dict_source(data))
    # a finished run among fresh ones is simply written out again, and the others train
    pair = [("a", Trainer(tiny(), small_cfg(total_tokens=B * 14), tmp_path / "done")),
            ("a", Trainer(tiny(), small_cfg(total_tokens=B * 14), tmp_path / "new"))]  # fmt: skip
    Trainer(tiny(), small_cfg(total_tokens=B * 14), tmp_path / "done").fit(_single(data, "a"))
    summaries = MultiTrainer(pair).fit(dict_source(data))
    assert [s["resumed_from_step"] for s in summaries] == [14, None]


# -- the command line on a tiny model ---------------------------------------------------------------
HOOKS = ["layers.0.resid_post", "layers.1.resid_post"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-data")
    model = tiny_llama(n_layers=2, d_model=32)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i} is about sparse feature number {i * 7}." for i in range(400)))
    common = ["--model", str(root / "model"), "--text", str(text), "--context-len", "32"]
    argv = ["cache", *common, "--hook", HOOKS[0], "--hook", HOOKS[1], "--tokens", "2500",
            "--out", str(root / "cache"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", str(root / "model"), "0" * 16)
    return root, common, loaded, text


TRAIN = ["--tokens", "1024", "--batch-size", "128", "--warmup-steps", "2", "--progress", "false",
         "--checkpoint-every", "3", "--eval-tokens", "0"]  # fmt: skip


def _weights(run):
    return load_file(str(run / "sae" / "sae.safetensors"))


@pytest.mark.parametrize("mode", ["cache", "stream"])
def test_train_many_gives_the_saes_train_gives(setup, tmp_path, mode):
    root, common, _, _ = setup
    data = (
        ["--cache", str(root / "cache")]
        if mode == "cache"
        else [*common, "--stream", "--outlier-factor", "0"]
    )
    specs = [f"arch=topk,k=4,hook={HOOKS[0]}", f"arch=relu,l1=2,hook={HOOKS[1]},expansion=3,name=wide",
             f"arch=topk,k=2,hook={HOOKS[1]},lr=0.002"]  # fmt: skip
    argv = ["train-many", *data, *TRAIN, "--expansion", "2", "--out", str(tmp_path / "many")]
    for spec in specs:
        argv += ["--sae", spec]
    assert main(argv) == 0
    names = [f"topk-{HOOKS[0]}-k4-x2", "wide", f"topk-{HOOKS[1]}-k2-lr0.002-x2"]
    alone = [["--arch", "topk", "--k", "4", "--hook", HOOKS[0], "--expansion", "2"],
             ["--arch", "relu", "--l1", "2", "--hook", HOOKS[1], "--expansion", "3"],
             ["--arch", "topk", "--k", "2", "--hook", HOOKS[1], "--expansion", "2",
              "--lr", "0.002"]]  # fmt: skip
    for name, opts in zip(names, alone, strict=True):
        run = tmp_path / "many" / name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["train"]["steps"] == 8 and summary["hook"] == opts[opts.index("--hook") + 1]
        assert json.loads((run / "run_config.json").read_text())["out"] == str(run)
        assert main(["train", *data, *TRAIN, *opts, "--out", str(tmp_path / name)]) == 0
        mine, theirs = _weights(run), _weights(tmp_path / name)
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), f"{name}: {k} differs from `saekit train`"
    if mode == "cache":  # again: every run is finished, nothing is retrained
        before = _weights(tmp_path / "many" / "wide")
        assert main(argv) == 0
        summary = json.loads((tmp_path / "many" / "wide" / "train_summary.json").read_text())
        assert summary["resumed_from_step"] == 8
        assert all(torch.equal(v, _weights(tmp_path / "many" / "wide")[k]) for k, v in before.items())


def test_stream_source_splits_one_forward_like_single_streams(setup):
    """With nothing excluded, each hook's batches equal the single-hook stream of `saekit train --stream`."""
    _, _, loaded, text = setup
    ex = ExtractConfig(model="tiny", text=str(text), context_len=32, outlier_factor=0.0)
    both = stream_source(loaded, HOOKS, 64, 3, text=str(text), context_len=32, buffer_rows=256)
    got = list(both(2))[:6]
    for hook in HOOKS:
        alone = streaming_batch_source(loaded, ExtractConfig(**{**ex.__dict__, "hook": [hook]}), 64, 3, 256)
        want = list(alone(2))[:6]
        assert len(got) == len(want) == 6
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g[hook], w)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("arch=topk,k", "KEY=VALUE"),
        ("k=4,k=8", "gives k twice"),
        ("batch_size=64", "cannot set batch_size: the batches are shared"),
        ("seed=1", "cannot set seed"),
        ("bogus=1", "has no option 'bogus'"),
        ("arch=topk,k=1.5", "not a valid value of topk's k"),
    ],
)
def test_bad_sae_specs_are_named(setup, tmp_path, spec, message):
    root, *_ = setup
    argv = ["train-many", "--cache", str(root / "cache"), "--out", str(tmp_path), "--sae", spec]
    with pytest.raises(ValueError, match=message):
        _run(argv)
    assert parse_sae_spec("arch=relu,l1=2") == {"arch": "relu", "l1_coeff": "2"}


def test_jobs_that_cannot_share_a_pass_are_refused(setup, tmp_path):
    root, common, _, _ = setup
    base = ["train-many", "--cache", str(root / "cache"), *TRAIN, "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="multilayer.*cannot share a pass"):
        _run(base + ["--sae", "arch=multilayer", "--sae", "arch=topk"])
    with pytest.raises(ValueError, match="several hook points .* choose one with --hook"):
        _run(base + ["--sae", "arch=topk,k=4", "--sae", f"arch=topk,k=2,hook={HOOKS[0]}"])
    with pytest.raises(ValueError, match="give the run name"):
        _run(base + ["--sae", f"hook={HOOKS[0]},name=x", "--sae", f"hook={HOOKS[1]},name=x"])


def _run(argv):
    from saekit.cli import COMMANDS, build_parser

    args = build_parser(argv).parse_args(argv)
    return COMMANDS[args.command](args)
