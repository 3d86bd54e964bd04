"""AFA evaluation: εLBO and f̃ hand-computed, the summary against direct formulas on topk / relu / gated /
top_afa SAEs, the decoder read through ``decode``, coherence, streaming, and the ZF plot PNG."""

import json
import math

import matplotlib
import pytest
import torch
from synthetic_training import perturb_

from saekit.eval.afa import (
    AFATokens,
    afa_stats,
    afa_summary,
    afa_tokens,
    decoder_coherence,
    decoder_rows,
    zf_plot,
)
from saekit.sae import GatedConfig, GatedSAE, ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saekit.sae.top_afa import TopAFAConfig, TopAFASAE


def _hand_relu() -> ReLUSAE:
    """d = 2, h = 3: encoder columns e1, e2, e1+e2; decoder rows [2, 0], [0, 1], [.6, .8]; b_dec [.3, .4]."""
    sae = ReLUSAE(ReLUConfig(d_in=2, width=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.3, 0.4]))
    return sae


def test_eps_lbo_hand_computed():
    z = torch.tensor([[1.3, 0.4], [-0.7, -0.6]])
    t = afa_tokens(_hand_relu(), z)
    # token 0: z - b = [1, 0], f = [1, 0, 1]; f̃ = [1·2, 0, 1·1, ‖b‖ = .5], ‖f̃‖² = 5.25, ‖z‖² = 1.85
    #          εLBO = |1.85 - 5.25| / ((3 - 1)·5.25); ẑ = [2, 0] + [.6, .8] + [.3, .4] = [2.9, 1.2]
    # token 1: z - b = [-1, -1], f = 0; f̃ = [0, 0, 0, .5], ‖f̃‖² = .25, ‖z‖² = .85, εLBO = .6 / (2·.25)
    eps0, eps1 = 3.4 / 10.5, 0.6 / 0.5
    torch.testing.assert_close(t.eps_lbo, torch.tensor([eps0, eps1], dtype=torch.float64))
    torch.testing.assert_close(t.z_norm, torch.tensor([1.85, 0.85], dtype=torch.float64).sqrt())
    torch.testing.assert_close(t.f_tilde_norm, torch.tensor([5.25, 0.25], dtype=torch.float64).sqrt())
    torch.testing.assert_close(t.nmse, torch.tensor([(1.6**2 + 0.8**2) / 1.85, (1.0 + 1.0) / 0.85]).double())
    torch.testing.assert_close(t.l0, torch.tensor([2.0, 0.0], dtype=torch.float64))

    s = afa_summary(t)
    assert s["eps_lbo_median"] == pytest.approx((eps0 + eps1) / 2)
    assert s["over_activated_fraction"] == 0.5  # token 0: ‖f̃‖ = 2.29 > ‖z‖ = 1.36
    # εLBO·(h-1) = 0.648 and 2.4: token 0 lies inside the c = 1 band only, token 1 in none
    assert s["band_fractions"] == {"0.25": 0.0, "0.5": 0.0, "1.0": 0.5}
    assert s["eps_lbo_undefined"] == 0 and s["l0"] == 1.0 and s["width"] == 3


def test_orthonormal_exact_dictionary_has_eps_lbo_zero():
    """Unit orthogonal atoms, no bias, exact reconstruction: ‖f̃‖ = ‖z‖, so εLBO = 0 and every band holds."""
    sae = ReLUSAE(ReLUConfig(d_in=3, width=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    s = afa_summary(afa_tokens(sae, torch.rand(10, 3) + 0.1))
    assert s["eps_lbo_quantiles"]["0.99"] == pytest.approx(0.0, abs=1e-12)
    assert all(v == 1.0 for v in s["band_fractions"].values())


def test_f_tilde_reconstructs_like_the_reference_check():
    """The notebook's ``test_f_tilde``: ẑ = f̃ · [Ŵ_dec ; b̂_dec] with row-normalised atoms, so ‖f̃‖ is the
    norm of the code in the basis the SAE decodes with."""
    torch.manual_seed(0)
    sae = perturb_(TopKSAE(TopKConfig(d_in=6, width=10, k=3)), 0.3)
    z = torch.randn(5, 6)
    W, b = decoder_rows(sae)
    f_tilde = torch.cat([sae.encode(z) * W.norm(dim=1), b.norm().expand(5, 1)], dim=1)
    atoms = torch.cat([W / W.norm(dim=1, keepdim=True), (b / b.norm())[None]])
    torch.testing.assert_close(f_tilde @ atoms, sae.decode(sae.encode(z)))
    torch.testing.assert_close(afa_tokens(sae, z).f_tilde_norm, f_tilde.norm(dim=1).double())


def test_undefined_eps_lbo_is_counted():
    sae = _hand_relu()
    with torch.no_grad():
        sae.b_dec.zero_()
    t = afa_tokens(sae, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))  # token 0: f = 0 and no bias: ‖f̃‖ = 0
    assert math.isnan(t.eps_lbo[0].item()) and math.isfinite(t.eps_lbo[1].item())
    s = afa_summary(t)
    assert s["eps_lbo_undefined"] == 1 and s["eps_lbo_median"] == pytest.approx(t.eps_lbo[1].item())
    json.dumps(s, allow_nan=False)


def _make(arch: str):
    d, m = 8, 24
    sae = {
        "topk": lambda: TopKSAE(TopKConfig(d_in=d, width=m, k=4)),
        "relu": lambda: ReLUSAE(ReLUConfig(d_in=d, width=m)),
        "gated": lambda: GatedSAE(GatedConfig(d_in=d, width=m)),
        "top_afa": lambda: TopAFASAE(TopAFAConfig(d_in=d, width=m)),
    }[arch]()
    return perturb_(sae, 0.3)


@pytest.mark.parametrize("arch", ["topk", "relu", "gated", "top_afa"])
def test_afa_stats_on_each_architecture(arch):
    torch.manual_seed(1)
    sae = _make(arch)
    x = 3 * torch.randn(200, 8)
    stats = afa_stats(sae, x)
    json.dumps(stats, allow_nan=False)  # plain JSON
    # direct formulas from the SAE's own tensors
    with torch.no_grad():
        f = sae.encode(x).double()
        x_hat = sae.decode(sae.encode(x)).double()
        W, b = sae.W_dec.double(), sae.b_dec.double()
        ft_sq = (f * W.norm(dim=1)).pow(2).sum(1) + b.pow(2).sum()
        eps = (x.double().pow(2).sum(1) - ft_sq).abs() / (23 * ft_sq)
        cos = (W / W.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).T
        off = cos[~torch.eye(24, dtype=torch.bool)]
    assert stats["n_tokens"] == 200 and stats["width"] == 24
    assert stats["eps_lbo_median"] == pytest.approx(torch.quantile(eps, 0.5).item(), rel=1e-9)
    assert stats["l0"] == pytest.approx((f != 0).sum(1).double().mean().item())
    nmse = ((x.double() - x_hat).pow(2).sum(1) / x.double().pow(2).sum(1)).mean().item()
    assert stats["normalized_mse"] == pytest.approx(nmse, rel=1e-9)
    assert stats["decoder"]["cos_max"] == pytest.approx(off.max().item(), rel=1e-9)
    assert stats["decoder"]["cos_mean"] == pytest.approx(off.mean().item(), rel=1e-6, abs=1e-12)
    assert stats["decoder"]["cos_max_abs"] == pytest.approx(off.abs().max().item(), rel=1e-9)
    assert len(stats["zf_points"]["z_norm"]) == 200


class _DoubledDecoder(TopKSAE):
    """``W_dec`` is not the decoder here: decode doubles it. The evaluation must read the real one."""

    def decode(self, f_NM):
        return 2 * (f_NM @ self.W_dec) + self.b_dec


def test_decoder_is_read_through_decode():
    torch.manual_seed(2)
    sae = perturb_(_DoubledDecoder(TopKConfig(d_in=5, width=9, k=2)), 0.3)
    W, b = decoder_rows(sae, chunk=4)
    torch.testing.assert_close(W, 2 * sae.W_dec.detach())
    torch.testing.assert_close(b, sae.b_dec.detach())
    plain = TopKSAE(sae.cfg)
    plain.load_state_dict(sae.state_dict())
    with torch.no_grad():
        plain.b_dec.add_(1000.0)  # raw-unit biases are large: the W_dec shortcut must still be recognised
    assert decoder_rows(plain)[0].data_ptr() == plain.W_dec.data_ptr()


def test_coherence_chunking_matches_one_block():
    torch.manual_seed(3)
    sae = _make("relu")
    assert decoder_coherence(sae, chunk=5) == pytest.approx(decoder_coherence(sae, chunk=1000), rel=1e-12)


def test_streamed_tokens_match_one_pass():
    torch.manual_seed(4)
    sae = _make("topk")
    x = torch.randn(50, 8)
    parts = AFATokens.cat([afa_tokens(sae, x[:20]), afa_tokens(sae, x[20:])])
    whole = afa_tokens(sae, x)
    for name in ("z_norm", "f_tilde_norm", "eps_lbo", "nmse", "l0"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name))
    assert afa_summary(parts, max_points=10)["zf_points"] == afa_summary(whole, max_points=10)["zf_points"]
    assert len(afa_summary(whole, max_points=10)["zf_points"]["z_norm"]) == 10


def test_width_one_is_refused():
    sae = TopKSAE(TopKConfig(d_in=3, width=1, k=1))
    with pytest.raises(ValueError, match="width >= 2"):
        afa_tokens(sae, torch.randn(2, 3))


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_zf_plot_writes_png(tmp_path):
    torch.manual_seed(5)
    backend = matplotlib.get_backend()
    topk, relu = _make("topk"), _make("relu")
    x = 3 * torch.randn(300, 8)
    stats = afa_stats(topk, x, coherence=False)
    _assert_png(zf_plot(stats, tmp_path / "from_stats.png", title="topk"))
    _assert_png(zf_plot(afa_tokens(relu, x), tmp_path / "from_tokens.png"))
    _assert_png(zf_plot({"topk": stats, "relu": afa_tokens(relu, x)}, tmp_path / "two.png"))
    assert matplotlib.get_backend() == backend  # the session's backend is left alone
    with pytest.raises(TypeError, match="zf_plot takes"):
        zf_plot({"a": {"no": "points"}}, tmp_path / "bad.png")
