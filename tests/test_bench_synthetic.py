"""`saekit bench synthetic`: recovery separates a wide TopK from a too-narrow one, the hierarchy scores on
a hand-built case, correlated groups, validation, and the command line end to end."""

import argparse
import json

import pytest
import torch

from saekit.bench.synthetic import (
    SyntheticBenchConfig,
    add_synthetic_parser,
    best_latents,
    cmd_bench_synthetic,
    correlated_groups,
    first_group,
    make_data,
    nesting_shares,
    run_synthetic_bench,
    tree_match,
)
from saekit.sae import get_architecture

EASY = dict(d=16, n_features=24, avg_active=2.0, exponent=0.0, noise_std=0.0, n_train=8_192, n_heldout=1_024)


def test_topk_recovers_the_features_and_a_too_narrow_one_cannot():
    wide = run_synthetic_bench(SyntheticBenchConfig(archs=["topk"], expansion=2.0, steps=300, **EASY))
    narrow = run_synthetic_bench(SyntheticBenchConfig(archs=["topk"], expansion=0.5, steps=300, **EASY))
    (w,), (n,) = wide["runs"], narrow["runs"]
    assert (w["width"], n["width"]) == (48, 12)
    assert w["options"] == {"k": 2}  # k defaults to the data's expected L0
    assert w["recovered"] >= 0.9 and w["mmcs"] >= 0.95, w
    # 12 latents for 24 features in general position: at most about half can be matched at cos >= 0.9
    assert n["recovered"] <= 0.55 and n["mmcs"] < w["mmcs"] - 0.1, n
    assert w["fvu"] < n["fvu"] and w["l0"] == pytest.approx(2.0, abs=0.1)
    assert wide["data"]["expected_l0"] == 2.0 and wide["data"]["n_true_features"] == 24


def test_hierarchy_scores_on_a_hand_built_case():
    # true features: parents 0, 1; children 2, 3 of parent 0 and 4 of parent 1 (axis directions in R^5)
    parent_F = torch.tensor([-1, -1, 0, 0, 1])
    dirs_FD = torch.eye(5)
    # 6 latents; the best match of feature j is latent perm[j] (latent 5 matches nothing)
    perm = [0, 3, 1, 4, 2]
    W_dec_MD = torch.zeros(6, 5)
    W_dec_MD[perm, range(5)] = torch.tensor([2.0, 1.0, 0.5, 3.0, 1.0])  # norms must not matter
    W_dec_MD[5] = torch.tensor([0.5, 0.4, 0.0, 0.0, 0.3])  # below every cos of the true matches
    best_F = best_latents(W_dec_MD, dirs_FD)
    assert best_F.tolist() == perm
    first_M = torch.tensor([True, True, False, False, False, False])  # first group: latents 0, 1
    # parents' best latents 0 (first) and 3 (not): 1/2; children's 1 (first), 4, 2 (not): 2/3
    assert nesting_shares(best_F, parent_F, first_M) == pytest.approx((0.5, 2 / 3))
    # tree: child 2 → latent 1, child 3 → 4, child 4 → 2; parents' latents: 0 → 0, 1 → 3
    parent_M = torch.tensor([-1, 0, 3, -1, 1, -1])  # 1 under 0 (right), 4 under 1 (wrong), 2 under 3 (right)
    assert tree_match(best_F, parent_F, parent_M) == pytest.approx(2 / 3)


def test_first_group_of_nested_saes():
    matryoshka = get_architecture("matryoshka")
    sae = matryoshka(matryoshka.config_class(d_in=4, width=8, k=2, group_fractions=[0.25, 0.75]))
    assert first_group(sae).tolist() == [True] * 2 + [False] * 6
    tree = get_architecture("tree")
    sae = tree(tree.config_class(d_in=4, width=8, k=2, k_per_layer=[1, 1], layer_sizes=[3, 5]))
    assert first_group(sae).tolist() == [True] * 3 + [False] * 5
    topk = get_architecture("topk")
    assert first_group(topk(topk.config_class(d_in=4, width=8, k=2))) is None


def test_correlated_groups_fire_together():
    x_ND, groups_GS = correlated_groups(2_000, torch.eye(12), 3, 4, 0.3, seed=1)
    assert groups_GS.shape == (3, 4) and len(set(groups_GS.flatten().tolist())) == 12 - 0  # disjoint
    on_NF = x_ND != 0
    for members in groups_GS:
        fired_N = on_NF[:, members[0]]
        assert (on_NF[:, members] == fired_N[:, None]).all()  # all members or none
        assert 0.25 < fired_N.float().mean() < 0.35
    assert (x_ND[on_NF] >= 0.5).all() and (x_ND[on_NF] <= 1.5).all()


def test_data_is_seeded_and_split():
    cfg = SyntheticBenchConfig(n_train=100, n_heldout=30, n_groups=2)
    a, b = make_data(cfg), make_data(cfg)
    assert a["train_ND"].shape == (100, 32) and a["heldout_ND"].shape == (30, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = make_data(SyntheticBenchConfig(n_train=100, n_heldout=30, n_groups=2, seed=1))
    assert not torch.equal(a["train_ND"], c["train_ND"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(archs=[]), "archs"),
        (dict(archs=["nope"]), "nope"),
        (dict(archs=["meta"]), "cannot be benchmarked"),
        (dict(n_groups=30, group_size=3), "90 distinct features"),
        (dict(expansion=0), "expansion"),
        (dict(parent_prob=1.5), "parent_prob"),
        (dict(avg_active=100), "avg_active"),
        (dict(k=0), "k must be positive"),
    ],
)
def test_impossible_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        run_synthetic_bench(SyntheticBenchConfig(steps=2, n_train=512, n_heldout=64, **settings))


def _bench_parser() -> argparse.ArgumentParser:
    """The `saekit bench synthetic` wiring the main CLI uses."""
    parser = argparse.ArgumentParser(prog="saekit")
    sub = parser.add_subparsers(dest="command")
    add_synthetic_parser(sub.add_parser("bench").add_subparsers(dest="bench", required=True))
    return parser


def test_command_line(tmp_path, capsys):
    small = ["--steps", "40", "--n-train", "2048", "--n-heldout", "512", "--batch-size", "128"]
    out = tmp_path / "bench.json"
    args = _bench_parser().parse_args(
        ["bench", "synthetic", "--archs", "topk", "relu", "jumprelu", "--l1", "2", *small, "--json", str(out)]
    )
    assert cmd_bench_synthetic(args) == 0
    table = capsys.readouterr().out
    assert "recovered" in table and "parents_first" not in table
    result = json.loads(out.read_text())
    assert [r["arch"] for r in result["runs"]] == ["topk", "relu", "jumprelu"]
    options = [r["options"] for r in result["runs"]]
    assert options == [{"k": 3}, {"l1_coeff": 2.0}, {"target_l0": 3.0}]
    for run in result["runs"]:
        assert 0 <= run["recovered"] <= 1 and -1 <= run["mmcs"] <= 1 and run["l0"] > 0

    args = _bench_parser().parse_args(
        ["bench", "synthetic", "--hierarchy", "--archs", "matryoshka", "tree", "--out", str(tmp_path), *small]
    )
    assert cmd_bench_synthetic(args) == 0
    assert "tree_match" in capsys.readouterr().out
    assert (tmp_path / "tree" / "sae" / "cfg.json").is_file()  # --out keeps the trained SAEs
    cfg = json.loads((tmp_path / "matryoshka" / "sae" / "cfg.json").read_text())
    assert "group_fractions" in json.dumps(cfg)
