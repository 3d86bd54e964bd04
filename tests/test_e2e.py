"""End-to-end training (saekit.train.e2e): the KL term by hand, the identity SAE, gradients only in the SAE
and against finite differences, the downstream MSE, validation, the token source, learning on a tiny llama
for two architectures, and exact resume of an e2e run."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import saekit.train.trainer as trainer_mod
from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR
from saekit.data import special_token_ids
from saekit.eval.splice import splice_fidelity
from saekit.models.hooks import capture, splice
from saekit.models.tiny import byte_tokenizer, tiny_gpt2, tiny_llama
from saekit.sae import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saekit.sae.base import SAEOutput
from saekit.train import TrainConfig, Trainer
from saekit.train.config import E2EConfig
from saekit.train.e2e import E2EObjective, e2e_training, kl_clean_to_spliced, token_batch_source
from saekit.train.logging import read_metrics

D, T, CONTEXTS = 32, 16, 4
HOOK = "layers.0.resid_post"
TOKENIZER = byte_tokenizer()
SPECIAL = special_token_ids(TOKENIZER)
TEXTS = [f"The {w} fox number {i} jumps over the lazy dog {i * 7 % 13}." for i in range(60) for w in "ab"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llama(n_layers=2, d_model=D)


@pytest.fixture
def no_plot(monkeypatch):
    """The training-curve PNG (matplotlib, seconds per fit) is tested with the trainer, not here."""
    monkeypatch.setattr(trainer_mod, "plot_training_curves", lambda *a, **k: None)


def source(seed: int = 0, texts: list[str] = TEXTS):
    return token_batch_source(lambda: texts, TOKENIZER, T, CONTEXTS, seed=seed, shuffle_batches=4)


def batch(seed: int = 0) -> torch.Tensor:
    return next(iter(source(seed)(0)))


def objective(model: nn.Module, **cfg) -> E2EObjective:
    return E2EObjective(model, HOOK, E2EConfig(e2e=True, **cfg), special_ids=SPECIAL, outlier_factor=None)


def relu_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, l1_coeff: float = 1e-3) -> ReLUSAE:
    sae = ReLUSAE(ReLUConfig(d_in=W_enc.shape[0], width=W_enc.shape[1], l1_coeff=l1_coeff))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
    return sae


def scaled_identity_sae(scale: float) -> ReLUSAE:
    """x̂ = scale · x exactly: f = (ReLU(x), ReLU(−x)), x̂ = scale · (f₊ − f₋)."""
    eye = torch.eye(D)
    return relu_sae(torch.cat([eye, -eye], 1), scale * torch.cat([eye, -eye], 0))


# -- the KL term ---------------------------------------------------------------------------------------
def test_kl_hand_computed_on_two_distributions():
    p = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]])  # clean, two positions
    q = torch.tensor([[[0.25, 0.75], [0.2, 0.8]]])  # spliced: differs at position 0 only
    logits = (q.log() + 3.0).requires_grad_()  # softmax is shift-invariant
    kl = kl_clean_to_spliced(p.log(), logits)
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2  # mean over positions
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # d/dlogits of (1/N) Σ_t KL(p_t ‖ softmax(z_t)) = (softmax(z_t) − p_t) / N
    (grad,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(grad, (q - p) / 2)


def test_identity_sae_has_zero_kl_and_zero_gradient(model):
    obj, ids = objective(model), batch()
    sae = scaled_identity_sae(1.0)
    out = obj.with_losses(ids, sae(obj.activations(ids)), 1.0)
    assert out.losses["e2e_kl"].item() == pytest.approx(0.0, abs=1e-7)
    grads = torch.autograd.grad(out.losses["e2e_kl"], list(sae.parameters()))
    assert max(g.abs().max().item() for g in grads) < 1e-6
    # the same check can fail: half the activation costs KL and has a gradient
    sae = scaled_identity_sae(0.5)
    out = obj.with_losses(ids, sae(obj.activations(ids)), 1.0)
    assert out.losses["e2e_kl"].item() > 1e-5
    grads = torch.autograd.grad(out.losses["e2e_kl"], list(sae.parameters()))
    assert max(g.abs().max().item() for g in grads) > 1e-5


def test_kl_on_a_tiny_llama_is_the_definition(model):
    """The objective's KL equals Σ_v p_clean (log p_clean − log p_spliced) averaged over all B·T positions,
    computed here with the plain splice helper, leaving the BOS/EOS positions clean."""
    obj, ids = objective(model), batch()
    torch.manual_seed(0)
    sae = ReLUSAE(ReLUConfig(d_in=D, width=64))
    out = obj.with_losses(ids, sae(obj.activations(ids)), 1.0)
    keep = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    assert keep[:, 0].all() and keep.sum() < ids.numel()  # BOS at position 0, maybe an EOS

    def replace(act_BTD):
        new = act_BTD.clone()
        new[~keep] = sae.decode(sae.encode(act_BTD[~keep]))
        return new

    with torch.no_grad():
        lp_clean = model(input_ids=ids).logits.double().log_softmax(-1)
        with splice(model, HOOK, replace):
            lp_sae = model(input_ids=ids).logits.double().log_softmax(-1)
    expected = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1).mean()
    assert out.metrics["e2e_kl"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.losses["e2e_kl"].item() == pytest.approx(expected.item(), rel=1e-4)  # coefficient 1.0


def test_kl_gradient_matches_finite_differences():
    """In float64 through a GPT-2-family model (Llama's RMSNorm computes in float32 even in a float64
    model, which would swamp the finite differences)."""
    model64 = tiny_gpt2(n_layers=2, d_model=D).double()
    obj, ids = objective(model64), batch()
    torch.manual_seed(1)
    sae = ReLUSAE(ReLUConfig(d_in=D, width=64)).double()
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # keep pre-activations off the ReLU kink
    x = obj.activations(ids)

    def kl(b_dec: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            sae.b_dec.copy_(b_dec)
        return obj.with_losses(ids, sae(x), 1.0).metrics["e2e_kl"]

    b0 = 0.1 * torch.randn(D, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.copy_(b0)
    (grad,) = torch.autograd.grad(obj.with_losses(ids, sae(x), 1.0).losses["e2e_kl"], [sae.b_dec])
    eps = 1e-6
    coords = range(0, D, 4)
    fd = torch.stack(
        [(kl(b0 + eps * e) - kl(b0 - eps * e)) / (2 * eps) for e in torch.eye(D).double()[coords]]
    )
    torch.testing.assert_close(grad[coords], fd, rtol=1e-4, atol=1e-9)
    assert grad.abs().max() > 1e-4


def test_gradients_reach_only_the_sae(model, tmp_path, no_plot):
    obj, ids = objective(model), batch()
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=D, width=64, k=4))
    obj.with_losses(ids, sae(obj.activations(ids)), 1.0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # a whole training run leaves the model's weights exactly as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sae_before = {k: v.clone() for k, v in sae.state_dict().items()}
    Trainer(sae, train_cfg(steps=3), tmp_path, objective=obj).fit(source())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(sae_before["W_enc"], sae.W_enc)


# -- downstream MSE and the SAE's own terms ------------------------------------------------------------
def test_downstream_mse_local_weight_and_sparsity_terms(model):
    """x̂ = x/2 at the spliced positions, trained at norm scale s = 2 (so the SAE sees 2x and returns x).
    layers.1.resid_pre is the very tensor the SAE replaces: its MSE is s² · Σ_spliced (x/2)² / (B·T·D)."""
    hooks = ["layers.1.resid_pre", "layers.1.resid_post"]
    obj = objective(model, e2e_downstream_hooks=hooks, e2e_local_coeff=0.3)
    ids = batch()
    sae = scaled_identity_sae(0.5)
    x = obj.activations(ids)
    sae_out = sae(2.0 * x)
    out = obj.with_losses(ids, sae_out, 2.0)

    mse_pre = 4.0 * (x / 2).pow(2).sum() / (ids.numel() * D)
    spliced = ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))

    def halve(act_BTD):
        new = act_BTD.clone()
        new[spliced] = act_BTD[spliced] / 2
        return new

    with torch.no_grad(), capture(model, ["layers.1.resid_post"]) as clean:
        model(input_ids=ids)
        h_clean = clean["layers.1.resid_post"]
        with splice(model, HOOK, halve):
            model(input_ids=ids)
        mse_post = 4.0 * (clean["layers.1.resid_post"] - h_clean).pow(2).mean()

    assert out.metrics["e2e_mse/layers.1.resid_pre"].item() == pytest.approx(mse_pre.item(), rel=1e-5)
    assert out.metrics["e2e_mse/layers.1.resid_post"].item() == pytest.approx(mse_post.item(), rel=1e-4)
    expected = 2.5 / 2 * (mse_pre + mse_post)  # total coefficient split evenly over the two hooks
    assert out.losses["e2e_downstream"].item() == pytest.approx(expected.item(), rel=1e-4)
    # with downstream hooks the KL coefficient defaults to Braun et al.'s 0.5
    assert out.losses["e2e_kl"].item() == pytest.approx(0.5 * out.metrics["e2e_kl"].item())
    # the local reconstruction is weighted, the sparsity term kept as the SAE computed it
    assert out.losses["recon"].item() == pytest.approx(0.3 * sae_out.losses["recon"].item())
    assert out.losses["l1"] is sae_out.losses["l1"]
    assert set(out.losses) == {"recon", "l1", "e2e_kl", "e2e_downstream"}
    # pure e2e (the default) drops the local term
    pure = objective(model).with_losses(ids, sae(2.0 * x), 2.0)
    assert set(pure.losses) == {"l1", "e2e_kl"}


# -- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(e2e_local_coeff=1.0), r"only apply to end-to-end training.*--e2e"),
        (dict(e2e=True, e2e_kl_coeff=-1.0), "e2e_kl_coeff must be >= 0"),
        (dict(e2e=True, e2e_downstream_coeff=-1.0), "e2e_downstream_coeff must be >= 0"),
        (dict(e2e=True, e2e_local_coeff=-0.1), "e2e_local_coeff must be >= 0"),
        (dict(e2e=True, e2e_downstream_hooks="layers.1.resid_pre"), "must be a list"),
        (dict(e2e=True, e2e_downstream_hooks=["layers.1.mlp_out"] * 2), "twice"),
        (dict(e2e=True, e2e_kl_coeff=0.0), "nothing would tie"),
    ],
)
def test_config_validation_names_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        E2EConfig(**kw).validate()


def test_objective_and_source_reject_impossible_settings(model):
    E2EConfig(e2e=True, e2e_kl_coeff=0.0, e2e_downstream_hooks=["layers.1.resid_post"]).validate()  # fine
    with pytest.raises(ValueError, match="e2e=True"):
        E2EObjective(model, HOOK, E2EConfig())
    with pytest.raises(ValueError, match="does not come after"):
        objective(model, e2e_downstream_hooks=["layers.0.resid_pre"])
    with pytest.raises(ValueError, match="does not come after"):
        objective(model, e2e_downstream_hooks=[HOOK])
    with pytest.raises(ValueError, match="out of range"):
        objective(model, e2e_downstream_hooks=["layers.9.resid_pre"])
    with pytest.raises(ValueError, match="outlier_factor"):
        E2EObjective(model, HOOK, E2EConfig(e2e=True), outlier_factor=0.5)
    with pytest.raises(ValueError, match="integer tensors"):
        objective(model).activations(torch.zeros(2, 8))

    class NoRecon(ReLUSAE):
        def forward(self, x, ctx=None):
            out = super().forward(x, ctx)
            return SAEOutput(out.x_hat, out.f, {"mse": out.losses["recon"]})

    obj, ids = objective(model), batch()
    with pytest.raises(ValueError, match=r"named 'recon'.*\['mse'\]"):
        obj.with_losses(ids, NoRecon(ReLUConfig(d_in=D, width=8))(obj.activations(ids)), 1.0)

    loaded = SimpleNamespace(model=model, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="multiple of context_len"):
        e2e_training(loaded, HOOK, E2EConfig(e2e=True), text="stdlib", split="train", context_len=16,
                     batch_size=40, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="fewer than 4 contexts"):
        next(iter(source(texts=["too short"])(0)))
    with pytest.raises(ValueError, match="contexts_per_batch"):
        token_batch_source(lambda: TEXTS, TOKENIZER, T, 0)


def test_token_source_is_deterministic_repeats_the_text_and_skips():
    few = TEXTS[:12]  # a few batches per pass: the stream must go round several times
    batches = [b for _, b in zip(range(30), source(3, few)(0), strict=False)]
    assert all(b.shape == (CONTEXTS, T) and b.dtype == torch.long for b in batches)
    assert (torch.stack(batches)[..., 0] == TOKENIZER.bos_token_id).all()
    skipped = [b for _, b in zip(range(20), source(3, few)(10), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(batches[10:], skipped, strict=True))
    assert not torch.equal(batches[0], next(iter(source(4, few)(0))))  # the seed shuffles


def test_e2e_training_builds_objective_and_source_from_a_text_file(model, tmp_path, no_plot):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(TEXTS))
    loaded = SimpleNamespace(model=model, tokenizer=TOKENIZER)
    cfg = E2EConfig(e2e=True)
    obj, src = e2e_training(loaded, HOOK, cfg, text=str(text), split="all", context_len=T,
                            batch_size=CONTEXTS * T, seed=0)  # fmt: skip
    assert (
        obj.special_ids == sorted(SPECIAL)
        and not obj.splice_special
        and obj.outlier_factor == DEFAULT_OUTLIER_FACTOR
    )
    assert next(iter(src(0))).shape == (CONTEXTS, T)
    torch.manual_seed(0)
    summary = Trainer(TopKSAE(TopKConfig(d_in=D, width=64, k=4)), train_cfg(steps=2), tmp_path / "run",
                      objective=obj).fit(src)  # fmt: skip
    assert summary["steps"] == 2 and 0 < summary["tokens"] < 2 * CONTEXTS * T  # BOS/EOS rows not trained on


# -- training ------------------------------------------------------------------------------------------
def train_cfg(steps: int, **kw) -> TrainConfig:
    base = dict(
        total_tokens=CONTEXTS * T * steps,
        batch_size=CONTEXTS * T,
        lr=1e-2,
        warmup_steps=5,
        init_tokens=2 * CONTEXTS * T,
        log_every=1,
        checkpoint_every=0,
        progress=False,
        threads=1,
    )
    return TrainConfig(**(base | kw))


ARCHS = {
    "topk": lambda: TopKSAE(TopKConfig(d_in=D, width=64, k=4)),
    "relu": lambda: ReLUSAE(ReLUConfig(d_in=D, width=64, l1_coeff=1e-4)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_e2e_training_lowers_the_spliced_kl(model, tmp_path, no_plot, arch):
    torch.manual_seed(0)
    trainer = Trainer(ARCHS[arch](), train_cfg(steps=50), tmp_path, objective=objective(model))
    trainer.fit(source())
    kls = [r["metrics/e2e_kl"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    start = kls[0]  # step 1: the SAE as initialised (b_dec, norm scale), before any update
    assert sum(kls[-5:]) / 5 < 0.5 * start
    # held out, measured by the evaluation code on the saved (folded) SAE
    sae = trainer.folded_sae()
    held = next(iter(source(seed=9, texts=TEXTS[::-1])(0)))
    fid = splice_fidelity(model, HOOK, lambda a: sae.decode(sae.encode(a)), held, special_ids=SPECIAL)
    assert fid["kl_sae"] < 0.5 * start


def test_e2e_resume_after_crashes_is_bit_identical(model, tmp_path, no_plot):
    cfg = train_cfg(steps=12, checkpoint_every=3, log_every=2)

    def sae():
        torch.manual_seed(0)
        return TopKSAE(TopKConfig(d_in=D, width=64, k=4))

    def crashing(after: int):
        def src(skip: int):
            for count, b in enumerate(source()(skip)):
                if count == after:
                    raise RuntimeError("simulated crash")
                yield b

        return src

    reference = Trainer(sae(), cfg, tmp_path / "ref", objective=objective(model))
    reference.fit(source())
    out = tmp_path / "crashy"
    # during the initial sample (2 batches), right after a checkpoint, mid-interval, at a random batch
    for after in (1, 5, 4, 2 + random.Random(0).randrange(4)):
        with pytest.raises(RuntimeError, match="simulated crash"):
            Trainer(sae(), cfg, out, objective=objective(model)).fit(crashing(after))
    with pytest.raises(ValueError, match="objective settings"):
        Trainer(sae(), cfg, out, objective=objective(model, e2e_local_coeff=0.5)).fit(source())
    resumed = Trainer(TopKSAE(TopKConfig(d_in=D, width=64, k=4)), cfg, out, objective=objective(model))
    summary = resumed.fit(source())
    assert summary["resumed_from_step"] > 0
    for k, v in reference.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k
    ref_adam, res_adam = reference.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_adam[i][k], res_adam[i][k]) for i in ref_adam for k in ref_adam[i])
    assert torch.equal(reference.dead.tokens_since_fire_M, resumed.dead.tokens_since_fire_M)

    def records(d):
        return [(r["step"], r["loss"], r["metrics/e2e_kl"]) for r in read_metrics(d / "metrics.jsonl")]

    assert records(out) == records(tmp_path / "ref")


def test_saekit_train_e2e_from_the_command_line(tmp_path, capsys):
    import json

    from saekit.cli import main
    from saekit.models.tiny import byte_tokenizer, tiny_llama

    model_dir, text = tmp_path / "model", tmp_path / "corpus.txt"
    tiny_llama(n_layers=3, d_model=32).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text(
        "\n\n".join(f"Paragraph {i} talks about sparse autoencoders and feature {i}." for i in range(400))
    )
    run = tmp_path / "run"
    argv = ["train", "--e2e", "--arch", "topk", "--k", "4", "--model", str(model_dir), "--text", str(text),
            "--hook", "layers.1.resid_post", "--context-len", "32", "--batch-size", "128", "--tokens", "1024",
            "--expansion", "2", "--warmup-steps", "1", "--progress", "false", "--eval-tokens", "256",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["steps"] == 8 and summary["eval"]["ce_loss_recovered"] is not None
    assert json.loads((run / "sae" / "cfg.json").read_text())["metadata"]["e2e"]["e2e"] is True
    capsys.readouterr()
    assert main([*argv[:1], "--cache", str(tmp_path), *argv[1:]]) == 2  # e2e reads contexts, not a cache
    assert "--e2e runs the model on token contexts" in capsys.readouterr().err
