"""Tests of saekit.train: schedules, dead-latent tracking, geometric median, config, and the trainer loop
(hook order, sparsity warm-up, NaN policies, normalization folding, outputs, exact resume)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saekit.sae.base import SAE, SAEConfig, SAEOutput, StepContext
from saekit.train import DeadLatentTracker, TrainConfig, Trainer, geometric_median, lr_factor, sparsity_scale
from saekit.train import checkpoint as checkpoint_mod
from saekit.train.logging import read_metrics
from saekit.train.schedules import LRSchedule

D, M, B = 12, 48, 32


# -- a tiny SAE owned by these tests, so the trainer is tested without any real architecture -------
@dataclass
class TinyConfig(SAEConfig):
    l1_coeff: float = 1e-2
    """L1 coefficient."""


class TinySAE(SAE):
    """ReLU + L1 with a unit-norm decoder constraint, a buffer, RNG use in training (input noise, so RNG
    state matters for exact resume) and a record of everything the trainer tells it."""

    config_class = TinyConfig
    arch = "tiny_test"

    def __init__(self, cfg: TinyConfig, seed: int = 0):
        super().__init__(cfg)
        gen = torch.Generator().manual_seed(seed)
        W = F.normalize(torch.randn(cfg.width, cfg.d_in, generator=gen), dim=1)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("n_forward", torch.zeros((), dtype=torch.int64))
        self.events: list[str] = []
        self.contexts: list[StepContext] = []
        self.init_center: torch.Tensor | None = None
        self.nan_at_step: int | None = None
        self._w_at_forward: torch.Tensor | None = None
        self.hook_checks: list[bool] = []

    def encode(self, x):
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x, ctx=None):
        ctx = ctx or StepContext()
        self.events.append("forward")
        self.contexts.append(StepContext(ctx.sparsity_scale, ctx.dead_mask.clone(), ctx.step))
        self._w_at_forward = self.W_dec.detach().clone()
        with torch.no_grad():
            self.n_forward += 1
        if self.training:
            x = x + 1e-3 * torch.randn_like(x)
        f = self.encode(x)
        x_hat = self.decode(f)
        losses = {
            "mse": (x_hat - x).pow(2).sum(-1).mean(),
            "l1": self.cfg.l1_coeff * ctx.sparsity_scale * f.sum(-1).mean(),
        }
        if self.nan_at_step is not None and ctx.step == self.nan_at_step:
            losses["mse"] = losses["mse"] * float("nan")
        return SAEOutput(x_hat, f, losses, {"n_forward": float(self.n_forward)})

    def before_optimizer_step(self):
        self.events.append("before")
        # gradients exist and the weights are still those of the forward pass
        self.hook_checks.append(self.W_dec.grad is not None and torch.equal(self.W_dec, self._w_at_forward))
        with torch.no_grad():
            unit = F.normalize(self.W_dec, dim=1)
            self.W_dec.grad -= (self.W_dec.grad * unit).sum(1, keepdim=True) * unit

    def after_optimizer_step(self):
        self.events.append("after")
        self.hook_checks.append(not torch.equal(self.W_dec, self._w_at_forward))  # the step happened
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def init_from_data(self, sample, b_dec_init):
        self.init_center = None if b_dec_init is None else b_dec_init.clone()
        super().init_from_data(sample, b_dec_init)


def make_data(n_batches: int = 24, scale: float = 40.0, seed: int = 1) -> torch.Tensor:
    """Sparse-ish synthetic activations with a large offset and scale, so normalization matters."""
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(20, D, generator=gen), dim=1)
    codes = torch.rand(n_batches * B, 20, generator=gen) * (
        torch.rand(n_batches * B, 20, generator=gen) < 0.15
    )
    return scale * (codes @ feats + 0.5)


def source_of(data: torch.Tensor, *, crash_after: int | None = None, calls: list[int] | None = None):
    """batch_source over ``data``, cycling; optionally raising after ``crash_after`` batches (a crash)."""
    n = data.shape[0] // B

    def source(skip: int):
        if calls is not None:
            calls.append(skip)
        for count, i in enumerate(range(skip, 10**9)):
            if crash_after is not None and count == crash_after:
                raise RuntimeError("simulated crash")
            yield data[(i % n) * B : (i % n + 1) * B].clone()

    return source


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        total_tokens=B * 30,
        batch_size=B,
        lr=3e-3,
        warmup_steps=4,
        decay="cosine",
        decay_start_fraction=0.5,
        final_lr_fraction=0.1,
        sparsity_warmup_steps=8,
        init_tokens=2 * B,
        dead_tokens=4 * B,
        log_every=5,
        checkpoint_every=6,
        progress=False,
        threads=1,  # tiny matrices: one thread avoids OpenMP overhead on a busy machine
    )
    base.update(kw)
    return TrainConfig(**base)


def tiny(seed: int = 0) -> TinySAE:
    return TinySAE(TinyConfig(d_in=D, width=M), seed=seed)


# -- schedules -------------------------------------------------------------------------------------
def test_lr_factor_values():
    kw = dict(total_steps=100, decay_start_fraction=0.5, final_lr_fraction=0.1)
    assert lr_factor(0, warmup_steps=10, **kw) == pytest.approx(0.1)
    assert lr_factor(4, warmup_steps=10, **kw) == pytest.approx(0.5)
    assert lr_factor(9, warmup_steps=10, **kw) == pytest.approx(1.0)
    assert lr_factor(49, decay="linear", **kw) == 1.0
    assert lr_factor(60, decay="linear", **kw) == pytest.approx(1 - 0.9 * 0.2)
    assert lr_factor(60, decay="cosine", **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi))
    )
    assert lr_factor(75, decay="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(99, decay="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.02)
    assert lr_factor(99, decay="constant", **kw) == 1.0
    # warm-up and decay overlapping multiply
    assert lr_factor(1, total_steps=10, warmup_steps=4, decay="linear") == pytest.approx(0.5 * 0.9)
    with pytest.raises(ValueError, match="decay"):
        lr_factor(0, total_steps=10, decay="exp")
    assert LRSchedule(100, 10, "cosine", 0.5, 0.1)(60) == lr_factor(60, warmup_steps=10, decay="cosine", **kw)


def test_sparsity_scale_values():
    assert [sparsity_scale(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert sparsity_scale(0, 0) == 1.0


# -- dead latents ----------------------------------------------------------------------------------
def test_dead_tracker_counts_tokens_and_caps_window():
    tr = DeadLatentTracker(3, dead_tokens=10)
    assert tr.tokens_since_fire_M.dtype == torch.int64
    assert not tr.dead_mask().any()  # nothing seen yet: nothing judged dead
    tr.update(torch.tensor([True, False, False]), 4)
    assert tr.tokens_since_fire_M.tolist() == [0, 4, 4] and tr.dead_mask().tolist() == [False, True, True]
    tr.update(torch.tensor([False, True, False]), 4)
    assert tr.dead_mask().tolist() == [False, False, True]  # window = 8 tokens seen
    tr.update(torch.tensor([False, False, False]), 4)  # 12 seen: window capped at 10
    assert tr.tokens_since_fire_M.tolist() == [8, 4, 12] and tr.dead_mask().tolist() == [False, False, True]
    tr.update(torch.tensor([False, False, False]), 4)
    assert tr.dead_mask().tolist() == [True, False, True]
    assert tr.dead_fraction() == pytest.approx(2 / 3)
    other = DeadLatentTracker(3, dead_tokens=10)
    other.load_state_dict(tr.state_dict())
    assert torch.equal(other.dead_mask(), tr.dead_mask()) and other.tokens_seen == 16
    with pytest.raises(ValueError, match="shape"):
        tr.update(torch.tensor([True]), 1)


# -- geometric median ------------------------------------------------------------------------------
def test_geometric_median_symmetric_points_and_point_at_median():
    c = torch.tensor([1.0, -2.0, 3.0])
    offsets = torch.cat([torch.eye(3), -torch.eye(3)]) * torch.tensor([1.0, 2.0, 5.0])
    assert torch.allclose(geometric_median(c + offsets), c, atol=1e-5)
    # one data point sits exactly at the median: the eps guard keeps it finite and converges there
    pts = torch.cat([c[None], c + offsets])
    gm = geometric_median(pts)
    assert torch.isfinite(gm).all() and torch.allclose(gm, c, atol=1e-4)


def test_geometric_median_robust_to_outliers_and_optimal():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    x[:10] += 1000.0  # a few huge outliers, like attention sinks
    gm = geometric_median(x)
    assert gm.norm() < 0.5 and x.mean(0).norm() > 50

    def cost(y):
        return (x - y).norm(dim=1).sum()

    for _ in range(20):  # no nearby point does better
        assert cost(gm) <= cost(gm + 1e-2 * torch.randn(5, generator=gen, dtype=torch.float64)) + 1e-9
    with pytest.raises(ValueError, match="NaN"):
        geometric_median(torch.tensor([[float("nan"), 0.0]]))


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("total_tokens", 0),
        ("batch_size", -1),
        ("lr", 0.0),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.1),
        ("adam_eps", 0.0),
        ("warmup_steps", -1),
        ("decay", "exp"),
        ("decay_start_fraction", 1.5),
        ("final_lr_fraction", -0.1),
        ("b_dec_init", "median"),
        ("nan_policy", "ignore"),
        ("grad_clip", -1.0),
        ("dead_tokens", 0),
        ("log_every", 0),
        ("checkpoint_every", -2),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


def test_config_dict_round_trip_and_hash():
    cfg = TrainConfig(total_tokens=1000, lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    assert cfg.total_steps == 1  # ceil(1000 / 4096)
    assert TrainConfig(log_every=7, progress=False).config_hash() == TrainConfig().config_hash()
    assert TrainConfig(lr=1e-3).config_hash() != TrainConfig().config_hash()


# -- the trainer loop ------------------------------------------------------------------------------
def test_hook_order_sparsity_warmup_lr_and_dead_mask(tmp_path):
    sae = tiny()
    with torch.no_grad():
        sae.b_enc[0] = -1e6  # latent 0 can never fire (no gradient reaches it): dead from step 2 on
    cfg = small_cfg(total_tokens=B * 12, checkpoint_every=0)
    summary = Trainer(sae, cfg, tmp_path).fit(source_of(make_data()))
    assert sae.events == ["forward", "before", "after"] * 12
    assert all(sae.hook_checks)
    assert [c.sparsity_scale for c in sae.contexts] == [min(1.0, s / 8) for s in range(12)]
    assert [c.step for c in sae.contexts] == list(range(12))
    assert not sae.contexts[0].dead_mask.any()
    assert all(c.dead_mask[0] for c in sae.contexts[1:])
    assert sae.contexts[-1].dead_mask.dtype == torch.bool and sae.contexts[-1].dead_mask.shape == (M,)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    for r in records:  # the logged lr is the one the step used
        assert r["lr"] == pytest.approx(cfg.lr * LRSchedule(12, 4, "cosine", 0.5, 0.1)(r["step"] - 1))
    assert summary["dead_fraction"] >= 1 / M


def test_outputs_metrics_png_summary_and_eval_callback(tmp_path):
    calls = []

    def on_eval(trainer, step):
        folded = trainer.folded_sae()
        assert not folded.training
        calls.append(step)
        return {"fvu_raw": 0.5}

    cfg = small_cfg(total_tokens=B * 13, eval_every=5)
    summary = Trainer(
        tiny(), cfg, tmp_path, on_eval=on_eval, sae_metadata={"hook": "layers.0.resid_post"}
    ).fit(source_of(make_data()))
    assert calls == [5, 10, 13]
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 13]
    expected = {"step", "tokens", "lr", "loss", "loss/mse", "loss/l1", "l0", "fvu", "dead_fraction"}
    expected |= {"tokens_per_s", "sparsity_scale", "rows_skipped", "metrics/n_forward"}
    assert expected <= set(train[0])
    assert train[-1]["tokens"] == 13 * B
    assert train[0]["loss"] == pytest.approx(train[0]["loss/mse"] + train[0]["loss/l1"])
    assert [r["eval/fvu_raw"] for r in records if r["kind"] == "eval"] == [0.5] * 3
    png = (tmp_path / "train_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved["steps"] == 13 and saved["tokens"] == 13 * B and saved == json.loads(json.dumps(summary))
    assert saved["norm_scale"] == summary["norm_scale"] and saved["sae"]["arch"] == "tiny_test"


@pytest.mark.parametrize("how", ["geometric_median", "mean", "zeros"])
def test_b_dec_init_and_norm_scale(tmp_path, how):
    data = make_data()
    sae = tiny()
    trainer = Trainer(sae, small_cfg(b_dec_init=how, init_tokens=3 * B - 5), tmp_path)
    batches = trainer._init_from_data(iter(source_of(data)(0)))
    assert torch.equal(next(batches), data[:B])  # the sample batches are given back to be trained on
    sample = data[: 3 * B - 5]  # exactly init_tokens rows
    s = trainer.norm_scale
    assert (s * sample).pow(2).sum(1).mean().item() == pytest.approx(D, rel=1e-5)
    want = {
        "geometric_median": geometric_median(s * sample),
        "mean": (s * sample).mean(0),
        "zeros": torch.zeros(D),
    }
    assert torch.allclose(sae.init_center, want[how], atol=1e-5)
    assert torch.equal(sae.b_dec, sae.init_center)


def test_folded_sae_on_raw_equals_trained_on_scaled(tmp_path):
    data = make_data()
    trainer = Trainer(tiny(), small_cfg(total_tokens=B * 10), tmp_path)
    trainer.fit(source_of(data))
    s = trainer.norm_scale
    assert s < 0.5  # the data is large: the scale really does something
    folded, trained = trainer.folded_sae(), trainer.sae.eval()
    x = data[:B]
    with torch.no_grad():
        f = trained.encode(s * x)
        assert torch.allclose(folded.encode(x), f, rtol=1e-4, atol=1e-5)
        assert torch.allclose(folded.decode(f), trained.decode(f) / s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_saved_real_sae_takes_raw_activations(tmp_path, arch):
    sae_mod = pytest.importorskip("saekit.sae")
    cls = sae_mod.get_architecture(arch)
    torch.manual_seed(0)
    sae = cls(cls.config_class(d_in=D, width=M, **({"k": 4} if arch == "topk" else {})))
    trainer = Trainer(sae, small_cfg(total_tokens=B * 8), tmp_path, sae_metadata={"hook": "h"})
    trainer.fit(source_of(make_data()))
    loaded = sae_mod.load_sae(tmp_path / "sae")
    assert loaded.metadata["normalization"]["scale"] == trainer.norm_scale
    assert loaded.metadata["hook"] == "h" and loaded.metadata["training"]["steps"] == 8
    x, s = make_data()[:B], trainer.norm_scale
    with torch.no_grad():
        trained = trainer.sae.eval()
        assert torch.allclose(loaded.encode(x), trained.encode(s * x), rtol=1e-4, atol=1e-4)
        assert torch.allclose(loaded(x).x_hat, trained(s * x).x_hat / s, rtol=1e-4, atol=1e-3)


def test_nan_rows_error_names_step_and_batch(tmp_path):
    data = make_data()
    data[3 * B + 5] = float("nan")
    data[3 * B + 9, 2] = float("inf")
    with pytest.raises(ValueError, match=r"step 4: batch 3 .* 2 of 32 rows"):
        Trainer(tiny(), small_cfg(), tmp_path).fit(source_of(data))


def test_nan_rows_skip_policy_counts_and_logs(tmp_path):
    data = make_data()
    data[3 * B + 5] = float("nan")
    data[3 * B + 9, 2] = float("inf")
    data[4 * B : 5 * B] = float("nan")  # a whole batch: skipped without a step
    cfg = small_cfg(total_tokens=B * 8, nan_policy="skip")
    summary = Trainer(tiny(), cfg, tmp_path).fit(source_of(data))
    assert summary["rows_skipped"] == 2 + B
    assert summary["steps"] == 8 and summary["batches_consumed"] == 9
    assert summary["tokens"] == 8 * B - 2
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["rows_skipped"] == 2 + B


def test_nan_loss_is_an_error_naming_the_step(tmp_path):
    sae = tiny()
    sae.nan_at_step = 6
    with pytest.raises(FloatingPointError, match="step 7"):
        Trainer(sae, small_cfg(), tmp_path).fit(source_of(make_data()))


def test_bad_batch_shape_and_exhausted_source(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(32, 5\)"):
        Trainer(tiny(), small_cfg(), tmp_path / "a").fit(lambda skip: iter([torch.zeros(B, 5)]))
    data = make_data(n_batches=5)
    with pytest.warns(UserWarning, match="ran out after 5 batches"):
        summary = Trainer(tiny(), small_cfg(), tmp_path / "b").fit(
            lambda skip: iter(data[skip * B :].split(B))
        )
    assert summary["stopped_early"] and summary["steps"] == 5


def test_resume_refuses_different_settings(tmp_path):
    data = make_data()
    Trainer(tiny(), small_cfg(total_tokens=B * 6), tmp_path).fit(source_of(data))
    with pytest.raises(ValueError, match=r"different training settings.*'lr': \(0.003, 0.001\)"):
        Trainer(tiny(), small_cfg(total_tokens=B * 6, lr=1e-3), tmp_path).fit(source_of(data))
    with pytest.raises(ValueError, match="width"):
        Trainer(TinySAE(TinyConfig(d_in=D, width=M + 1)), small_cfg(total_tokens=B * 6), tmp_path).fit(
            source_of(data)
        )
    # settings that only change how the run is observed may differ: resuming a finished run is a no-op
    trainer = Trainer(
        tiny(), small_cfg(total_tokens=B * 6, log_every=2, threads=torch.get_num_threads()), tmp_path
    )
    assert trainer.fit(source_of(data))["resumed_from_step"] == 6


# -- exact resume ----------------------------------------------------------------------------------
def _final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"sae.{k}": v for k, v in trainer.sae.state_dict().items()}
    for i, s in trainer.optimizer.state_dict()["state"].items():
        state.update({f"adam.{i}.{k}": v for k, v in s.items()})
    state["dead"] = trainer.dead.tokens_since_fire_M
    return state


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def _losses(out_dir: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["l0"])
        for r in read_metrics(out_dir / "metrics.jsonl")
        if r["kind"] == "train"
    ]


def test_resume_after_crashes_is_bit_identical(tmp_path, monkeypatch):
    data = make_data()
    cfg = small_cfg()
    reference = Trainer(tiny(), cfg, tmp_path / "ref")
    reference.fit(source_of(data))

    out = tmp_path / "crashy"
    rng = random.Random(0)
    # crash during the initial sample, right after a checkpoint, mid-interval, and at random batches
    crash_points = [1, 6, 4, 1 + rng.randrange(10), 1 + rng.randrange(10)]
    skips: list[int] = []
    for crash_after in crash_points:
        with pytest.raises(RuntimeError, match="simulated crash"):
            Trainer(tiny(), cfg, out).fit(source_of(data, crash_after=crash_after, calls=skips))

    # a crash while the checkpoint is being written leaves the previous one intact
    real_save = torch.save

    def torn_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        Trainer(tiny(), cfg, out).fit(source_of(data))
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    resumed = Trainer(tiny(seed=123), cfg, out)  # other initial weights: the checkpoint must replace them
    summary = resumed.fit(source_of(data, calls=skips))
    assert summary["resumed_from_step"] > 0 and skips[-1] == summary["resumed_from_step"]
    _assert_identical(_final_state(reference), _final_state(resumed))
    assert _losses(out) == _losses(tmp_path / "ref")


def test_resume_after_killed_subprocess_is_bit_identical(tmp_path):
    """SIGKILL a training process at an arbitrary moment (possibly mid-checkpoint), then resume here."""
    data = make_data()
    cfg = small_cfg(total_tokens=B * 40, checkpoint_every=3)
    reference = Trainer(tiny(), cfg, tmp_path / "ref")
    reference.fit(source_of(data))

    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_train as t
        from saekit.train import Trainer
        base = t.source_of(t.make_data())
        def slow(skip):
            for b in base(skip):
                time.sleep(0.02)
                yield b
        Trainer(t.tiny(), t.small_cfg(total_tokens=t.B * 40, checkpoint_every=3), {str(out)!r}).fit(slow)
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the training subprocess never wrote a checkpoint"
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.05, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train_summary.json").exists(), "the subprocess finished before it was killed"

    resumed = Trainer(tiny(seed=7), cfg, out)
    summary = resumed.fit(source_of(data))
    assert summary["resumed_from_step"] >= 3
    _assert_identical(_final_state(reference), _final_state(resumed))
    assert _losses(out) == _losses(tmp_path / "ref")


def test_the_trainer_gives_each_parameter_group_its_learning_rate_scale(tmp_path):
    """JumpReLU's log θ gets threshold_lr_scale × lr, through warm-up and decay alike."""
    from saekit.sae import JumpReLUConfig, JumpReLUSAE

    sae = JumpReLUSAE(JumpReLUConfig(d_in=4, width=8, threshold_lr_scale=7.0))
    cfg = TrainConfig(
        total_tokens=64, batch_size=16, lr=1e-3, warmup_steps=2, checkpoint_every=0, progress=False
    )
    trainer = Trainer(sae, cfg, tmp_path)
    main, thresholds = trainer.optimizer.param_groups
    assert thresholds["params"] == [sae.log_threshold]
    assert not any(p is sae.log_threshold for p in main["params"])
    assert thresholds["lr"] == pytest.approx(7.0 * main["lr"])
    trainer.scheduler.step()
    assert thresholds["lr"] == pytest.approx(7.0 * main["lr"]) and main["lr"] > 0


def test_adam_steps_a_transposed_parameter_through_its_contiguous_alias():
    """A latent-major W_enc (a transposed (M, d) tensor) is stepped by fused Adam through a contiguous alias
    sharing its storage: the same update as Adam on the parameter itself."""
    from saekit.train.trainer import contiguous_alias

    torch.manual_seed(0)
    base = torch.randn(12, 5)
    p = torch.nn.Parameter(base.clone().t())  # (5, 12), stored as the transpose of (12, 5)
    ref = torch.nn.Parameter(base.clone().t().contiguous())
    assert contiguous_alias(ref) is None and contiguous_alias(torch.nn.Parameter(torch.randn(3))) is None
    alias = contiguous_alias(p)
    assert alias is not None and alias.is_contiguous() and alias.data_ptr() == p.data_ptr()
    opt = torch.optim.Adam([alias], lr=0.1, fused=True)
    opt_ref = torch.optim.Adam([ref], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(5, 12)
        p.grad, ref.grad = g.t().contiguous().t(), g.clone()  # the sparse backward's layout for p
        alias.grad = p.grad.t()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(p.detach(), ref.detach())
    assert p.stride() == (1, 5)  # still latent-major
