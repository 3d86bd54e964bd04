"""Meta-SAE: BatchTopK with the meta-SAE defaults, its training rows (a saved SAE's unit decoder rows), the
decoder fraction of variance explained and the decomposition of a base latent (hand-computed), folding,
save/load, validation, and recovery of the meta-directions that the base decoder rows are built from."""

import pytest
import torch
from synthetic_training import assert_fold_input_scale_exact, perturb_, train_on_synthetic, with_dead_mask

import saekit
from saekit.eval.synthetic import recovered_fraction, synthetic_activations
from saekit.sae import BatchTopKSAE, TopKConfig, TopKSAE, get_architecture, load_sae, save_sae
from saekit.sae.meta import MetaConfig, MetaSAE, decoder_fve, decomposition


def test_is_batchtopk_with_the_meta_defaults():
    assert get_architecture("meta") is MetaSAE and issubclass(MetaSAE, BatchTopKSAE)
    cfg = MetaConfig(d_in=8, width=16, base_sae="base")
    assert cfg.k == 4 and cfg.aux_coeff == pytest.approx(1 / 16) and cfg.threshold_lr == 0.01


def _saved_base(tmp_path, rows_ND: torch.Tensor, scales_N: torch.Tensor, run_folder: bool = False) -> str:
    """A TopK SAE whose decoder rows are ``rows_ND`` scaled by ``scales_N``, saved as an SAE folder (or as
    a run folder holding sae/)."""
    n, d = rows_ND.shape
    base = TopKSAE(TopKConfig(d_in=d, width=n, k=1))
    with torch.no_grad():
        base.W_dec.copy_(rows_ND * scales_N[:, None])
    path = tmp_path / "run" if run_folder else tmp_path / "base"
    save_sae(base, path / "sae" if run_folder else path)
    return str(path)


@pytest.mark.parametrize("run_folder", [False, True])
def test_own_training_rows_are_the_unit_decoder_rows(tmp_path, run_folder):
    torch.manual_seed(0)
    rows = torch.randn(12, 5, dtype=torch.float64)
    scales = torch.rand(12, dtype=torch.float64) * 3 + 0.1
    path = _saved_base(tmp_path, rows, scales, run_folder)
    got = MetaSAE.own_training_rows({"base_sae": path, "width": 4})
    assert got.dtype == torch.float32 and got.shape == (12, 5)
    torch.testing.assert_close(got, (rows / rows.norm(dim=1, keepdim=True)).float())
    torch.testing.assert_close(got.norm(dim=1), torch.ones(12))
    assert MetaSAE.own_training_rows({"base_sae": path, "d_in": 5}).shape == (12, 5)
    with pytest.raises(ValueError, match="d_in=6"):
        MetaSAE.own_training_rows({"base_sae": path, "d_in": 6})
    with pytest.raises(ValueError, match="base_sae"):
        MetaSAE.own_training_rows({"width": 4})
    with pytest.raises(FileNotFoundError):
        MetaSAE.own_training_rows({"base_sae": str(tmp_path / "missing")})


ROWS_HAND = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])


def _hand_meta() -> MetaSAE:
    """Three meta-latents with encoder columns = decoder rows = e1, e2, [0.6, 0.8]; θ = 0.7."""
    meta = MetaSAE(MetaConfig(d_in=2, width=3, k=1, base_sae="unused"))
    with torch.no_grad():
        meta.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        meta.W_enc.copy_(meta.W_dec.T)
        meta.threshold.fill_(0.7)
    return meta.eval()


def test_decomposition_and_decoder_fve_hand_computed():
    meta = _hand_meta()
    # row 0 = [1, 0]: π = [1, 0, 0.6] -> only meta-latent 0 passes θ = 0.7; d̂ = [1, 0] exactly
    # row 1 = [0.6, 0.8]: π = [0.6, 0.8, 1] -> latents 2 (1.0), 1 (0.8); d̂ = [0.6, 1.6], error 0.64
    # row 2 = [0, 1]: π = [0, 1, 0.8] -> latents 1 (1.0), 2 (0.8); d̂ = [0.48, 1.64], error 0.64
    assert decomposition(meta, 0, ROWS_HAND) == [(0, 1.0)]
    assert decomposition(meta, 1, ROWS_HAND) == [(2, pytest.approx(1.0)), (1, pytest.approx(0.8))]
    assert decomposition(meta, 2, ROWS_HAND) == [(1, pytest.approx(1.0)), (2, pytest.approx(0.8))]
    # mean row [8/15, 3/5]; Σ‖d − mean‖² = 3 − 3·(64 + 81)/225 = 16/15; FVE = 1 − 1.28 / (16/15) = −0.2
    assert decoder_fve(meta, ROWS_HAND) == pytest.approx(-0.2)
    assert decoder_fve(meta, ROWS_HAND, batch_size=2) == pytest.approx(-0.2)  # batching changes nothing
    with pytest.raises(IndexError, match="3 latents"):
        decomposition(meta, 3, ROWS_HAND)


def test_helpers_default_to_the_configured_base(tmp_path):
    path = _saved_base(tmp_path, ROWS_HAND, torch.tensor([2.0, 0.5, 3.0]))
    meta = _hand_meta()
    meta.cfg.base_sae = path
    torch.testing.assert_close(meta.base_rows(), ROWS_HAND)
    assert decomposition(meta, 1) == decomposition(meta, 1, ROWS_HAND)
    assert decoder_fve(meta) == pytest.approx(-0.2)


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    meta = perturb_(MetaSAE(MetaConfig(d_in=6, width=12, base_sae="b")), 0.3)
    with torch.no_grad():
        meta.threshold.fill_(0.2)
    assert_fold_input_scale_exact(meta, torch.randn(7, 6), 4.0)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    meta = perturb_(MetaSAE(MetaConfig(d_in=6, width=12, base_sae="some/base")), 0.3)
    with torch.no_grad():
        meta.threshold.fill_(0.25)
    loaded = saekit.load(save_sae(meta, tmp_path / "meta"))
    assert type(loaded) is MetaSAE and loaded.cfg == meta.cfg and loaded.cfg.base_sae == "some/base"
    for name, t in meta.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded.encode(x), meta.encode(x), rtol=0, atol=0)
    assert load_sae(tmp_path / "meta").threshold.item() == pytest.approx(0.25)


@pytest.mark.parametrize("kw, match", [({"base_sae": ""}, "base_sae"), ({"k": 0}, "k must")])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MetaConfig(**{"d_in": 4, "width": 8, "base_sae": "b", **kw}).validate()


def test_recovers_the_meta_directions_of_the_decoder_rows(tmp_path):
    """Base decoder rows are (rescaled) sparse non-negative combinations of 16 meta-directions, 4 on average;
    a meta-SAE trained on ``own_training_rows`` (as the trainer would: normalised to E‖x‖² = d, then
    folded) finds the meta-directions, explains the rows, and decomposes a row into its parts."""
    d = 32
    rows, meta_dirs = synthetic_activations(3000, d, 16, avg_active=4.0, exponent=0.0, seed=1)
    rows = rows[rows.norm(dim=1) > 0]
    torch.manual_seed(0)
    path = _saved_base(tmp_path, rows, torch.rand(len(rows)) + 0.5)
    train_rows = MetaSAE.own_training_rows({"base_sae": path})
    meta = MetaSAE(MetaConfig(d_in=d, width=32, base_sae=path))
    train_on_synthetic(meta, train_rows * d**0.5, 200, with_dead_mask)
    meta.eval().fold_input_scale(d**0.5)
    assert recovered_fraction(meta.W_dec, meta_dirs) >= 0.9
    assert decoder_fve(meta) >= 0.95
    # a base latent made of meta-directions 3 and 11 decomposes into the meta-latents that found them
    both = meta_dirs[3] + meta_dirs[11]
    parts = decomposition(meta, 0, (both / both.norm())[None])
    found = (meta.W_dec.detach()[[m for m, _ in parts[:2]]] @ meta_dirs.T).argmax(1)
    assert sorted(found.tolist()) == [3, 11]
