"""Progressive coding for any SAE: latent orders, permuting latents (every architecture), truncation after
the SAE's own selection, the FVU/L0 curve, the width grid, and CE recovered per width on a tiny Llama."""

import pytest
import torch
from synthetic_training import perturb_

from saekit.eval.metrics import fvu
from saekit.eval.progressive import (
    geometric_widths,
    latent_order,
    permute_latents,
    progressive_curve,
    progressive_fidelity,
    truncated,
)
from saekit.eval.splice import splice_fidelity
from saekit.models.tiny import tiny_llama
from saekit.sae import TopKConfig, TopKSAE, get_architecture

D, M = 6, 20
ARCHS = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "relu": {},
    "relu-tied": {"tied": True},
    "gated": {},
    "jumprelu": {"init_threshold": 0.2},
    "matryoshka": {"k": 4, "group_fractions": [0.25, 0.75]},
}


def _make(name: str, d_in: int = D, width: int = M):
    arch = name.removesuffix("-tied")
    cls = get_architecture(arch)
    torch.manual_seed(0)
    sae = perturb_(cls(cls.config_class(d_in=d_in, width=width, **ARCHS[name])), 0.2)
    if "threshold" in dict(sae.named_buffers()):  # BatchTopK's global θ: as if estimated
        with torch.no_grad():
            sae.threshold.fill_(0.3)
    return sae.eval()


def _x(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _reconstruct(sae, x):
    return sae.decode(sae.encode(x))


@pytest.mark.parametrize("name", list(ARCHS))
def test_permute_latents_keeps_outputs(name):
    sae = _make(name)
    x = _x()
    f = sae.encode(x)
    assert (f != 0).any(dim=0).sum() >= 5, "the check needs several active latents"
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    order = torch.randperm(M, generator=torch.Generator().manual_seed(3))
    permuted = permute_latents(sae, order)
    torch.testing.assert_close(permuted.encode(x), f[:, order])
    torch.testing.assert_close(_reconstruct(permuted, x), _reconstruct(sae, x))
    for k, v in sae.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    assert not torch.equal(permuted.W_dec, sae.W_dec)


@pytest.mark.parametrize("name", ["topk", "jumprelu", "gated", "matryoshka"])
def test_truncating_a_permuted_sae_to_its_first_latents_is_truncating_in_order(name):
    sae = _make(name)
    x = _x()
    order = latent_order(sae, x, "energy")
    first = permute_latents(sae, order)
    for g in (0, 3, 11, M):
        torch.testing.assert_close(truncated(first, torch.arange(M), g)(x), truncated(sae, order, g)(x))


def test_matryoshka_prefix_is_truncation_in_index_order():
    sae = _make("matryoshka")
    x = _x()
    for g in (0, 5, 7, M):
        torch.testing.assert_close(
            truncated(sae, torch.arange(M), g)(x), sae.decode(sae.encode(x, width=g), width=g)
        )


class _WithMixing(TopKSAE):
    """A TopK SAE with an extra (3, width) buffer: its latent axis cannot be guessed."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("mix", torch.arange(3 * cfg.width, dtype=torch.float32).view(3, cfg.width))


class _DeclaredMixing(_WithMixing):
    latent_axes = {"mix": 1}


def test_ambiguous_latent_axis_raises_unless_declared():
    cfg = TopKConfig(d_in=D, width=M, k=2)
    with pytest.raises(ValueError, match=r"_WithMixing\.mix.*latent_axes"):
        permute_latents(_WithMixing(cfg), torch.arange(M))
    order = torch.arange(M).flip(0)
    permuted = permute_latents(_DeclaredMixing(cfg), order)
    assert torch.equal(permuted.mix, torch.arange(3 * M, dtype=torch.float32).view(3, M)[:, order])


def test_square_sae_needs_declared_axes_for_unknown_per_latent_tensors():
    # d_in == width: an undeclared 1-D tensor of that length may be per latent or per input dimension
    class Undeclared(TopKSAE):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.scale = torch.nn.Parameter(torch.ones(cfg.width))

    with pytest.raises(ValueError, match="scale"):
        permute_latents(Undeclared(TopKConfig(d_in=M, width=M, k=2)), torch.arange(M))
    x = torch.randn(10, M)
    order = torch.randperm(M, generator=torch.Generator().manual_seed(0))
    for arch in ("topk", "jumprelu", "gated"):  # b_enc is known; the others declare their latent_axes
        sae = _make(arch, d_in=M)
        torch.testing.assert_close(permute_latents(sae, order).encode(x), sae.encode(x)[:, order])


def test_declared_axis_of_wrong_length_raises():
    class Bad(TopKSAE):
        latent_axes = {"b_dec": 0}

    with pytest.raises(ValueError, match="b_dec.*not of length"):
        permute_latents(Bad(TopKConfig(d_in=D, width=M, k=2)), torch.arange(M))


def test_order_must_be_a_permutation():
    sae = _make("topk")
    for bad in (torch.arange(M - 1), torch.zeros(M, dtype=torch.long), torch.arange(1, M + 1)):
        with pytest.raises(ValueError, match="permutation"):
            permute_latents(sae, bad)
        with pytest.raises(ValueError, match="permutation"):
            truncated(sae, bad, 3)


def test_energy_and_frequency_orders():
    sae = _make("relu")
    x = _x(60)
    f = sae.encode(x)
    energy = f.pow(2).mean(0)
    order = latent_order(sae, x, "energy", batch_size=7)  # several batches
    assert sorted(order.tolist()) == list(range(M))
    assert (energy[order][:-1] >= energy[order][1:]).all(), "energy order must be descending E[f²]"
    torch.testing.assert_close(energy[order], energy.sort(descending=True).values)
    freq = (f != 0).float().mean(0)
    order_f = latent_order(sae, x, "frequency", batch_size=7)
    assert (freq[order_f][:-1] >= freq[order_f][1:]).all()
    assert torch.equal(latent_order(sae, x, "index"), torch.arange(M))
    with pytest.raises(ValueError, match="by must be"):
        latent_order(sae, x, "size")


def test_truncation_to_full_width_is_the_sae():
    for name in ARCHS:
        sae = _make(name)
        x = _x()
        order = torch.randperm(M, generator=torch.Generator().manual_seed(5))
        assert torch.equal(truncated(sae, order, M)(x), _reconstruct(sae, x))


def test_truncation_zeroes_after_selection_without_reselecting():
    sae = TopKSAE(TopKConfig(d_in=2, width=3, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 2.0]])  # pre = [1, 2, 3]: top-1 is latent 2 (value 3)
    keep_first_two = truncated(sae, [0, 1, 2], 2)
    # latent 2 is dropped after the selection: the code is empty (a re-selection would pick latent 1)
    torch.testing.assert_close(keep_first_two(x), torch.zeros(1, 2))
    torch.testing.assert_close(truncated(sae, [2, 0, 1], 1)(x), torch.tensor([[1.8, 2.4]]))


def test_progressive_curve_matches_direct_truncation():
    sae = _make("topk")
    x = _x(50)
    widths = [0, 2, 5, 10, M]
    rows = progressive_curve(sae, x, widths, by="energy", batch_size=16)
    order = latent_order(sae, x, "energy")
    assert [r["width"] for r in rows] == widths
    for r in rows:
        x_hat = truncated(sae, order, r["width"])(x)
        assert r["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-6)
        assert r["mse"] == pytest.approx((x - x_hat).pow(2).mean().item(), rel=1e-5)
    assert rows[0]["l0"] == 0 and rows[-1]["l0"] == pytest.approx(4.0)
    assert all(a["l0"] <= b["l0"] for a, b in zip(rows, rows[1:], strict=False))
    assert rows[-1]["fvu"] == pytest.approx(fvu(x, _reconstruct(sae, x)), rel=1e-6)
    # a given order is used as is, and `by` picks the order otherwise
    by_index = progressive_curve(sae, x, [5], order=torch.arange(M))
    assert by_index[0]["fvu"] == pytest.approx(fvu(x, truncated(sae, torch.arange(M), 5)(x)), rel=1e-6)
    by_freq = progressive_curve(sae, x, [5], by="frequency")
    x_hat = truncated(sae, latent_order(sae, x, "frequency"), 5)(x)
    assert by_freq[0]["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-6)
    assert len({by_index[0]["fvu"], by_freq[0]["fvu"], rows[2]["fvu"]}) == 3, "orders should differ here"


def test_geometric_widths():
    assert geometric_widths(64, 5) == [4, 8, 16, 32, 64]
    assert geometric_widths(100, 3, ratio=3) == [11, 33, 100]
    # 10/32 rounds to 0 and 10/16, 10/8 both to 1: dropped or merged
    assert geometric_widths(10, 6) == [1, 3, 5, 10]
    assert geometric_widths(7, 1) == [7]
    with pytest.raises(ValueError, match="ratio"):
        geometric_widths(64, 3, ratio=1.0)
    with pytest.raises(ValueError):
        geometric_widths(0, 3)


def test_progressive_fidelity_on_tiny_llama():
    model = tiny_llama(n_layers=2, d_model=32)
    hook = "layers.1.resid_post"
    torch.manual_seed(0)
    sae = perturb_(TopKSAE(TopKConfig(d_in=32, width=48, k=8)), 0.1).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 259, (2, 12), generator=g)
    tokens[:, 0] = 0
    order = torch.randperm(48, generator=g)
    special = {0, 1, 2}
    rows = progressive_fidelity(sae, model, hook, [tokens], [0, 12, 48], order, special_ids=special)
    assert [r["width"] for r in rows] == [0, 12, 48]
    full = splice_fidelity(model, hook, lambda a: _reconstruct(sae, a), tokens, special_ids=special)
    assert rows[-1]["ce_sae"] == pytest.approx(full["ce_sae"], abs=1e-9)
    assert rows[-1]["ce_loss_recovered"] == pytest.approx(full["ce_loss_recovered"], abs=1e-9)
    empty = splice_fidelity(model, hook, lambda a: sae.b_dec.expand_as(a), tokens, special_ids=special)
    assert rows[0]["ce_sae"] == pytest.approx(empty["ce_sae"], abs=1e-9)
    assert len({round(r["ce_sae"], 9) for r in rows}) == 3, "each width must splice a different x̂"
    for r in rows:
        assert r["ce_clean"] == pytest.approx(full["ce_clean"])
        assert r["n_predictions"] == 2 * 11


def test_switch_latents_are_not_permutable_but_truncate():
    from saekit.sae.switch import SwitchConfig, SwitchSAE

    sae = SwitchSAE(SwitchConfig(d_in=D, width=M, n_experts=2, k=2))
    with pytest.raises(ValueError, match="cannot be reordered"):
        permute_latents(sae, torch.arange(M))
    x = _x()
    torch.testing.assert_close(truncated(sae, torch.arange(M), M)(x), sae.decode(sae.encode(x)))
