"""save_sae / load_sae: round trip for every architecture (parameters and buffers), metadata, atomic
replacement, and a clear error for each way a saved folder can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.sae import available_architectures, get_architecture, load_sae, save_sae
from saekit.sae.io import CFG_FILE, FORMAT_VERSION, WEIGHTS_FILE

EXTRA_CFG = {
    "topk": {"k": 3},
    "batchtopk": {"k": 3, "threshold_lr": 0.05},
    "relu": {"tied": True, "l1_coeff": 0.7},
}


def _make(arch: str, **kw):
    cls = get_architecture(arch)
    sae = cls(cls.config_class(d_in=6, width=10, **{**EXTRA_CFG.get(arch, {}), **kw}))
    with torch.no_grad():
        for t in list(sae.parameters()) + list(sae.buffers()):
            t.add_(torch.rand_like(t))  # every tensor differs from its init, buffers included
    return sae


def test_all_five_architectures_are_registered():
    assert set(available_architectures()) >= {"relu", "topk", "batchtopk", "gated", "jumprelu"}


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("relu", {}),
        ("relu", {"tied": False, "decoder_norm": "weighted"}),
        ("topk", {}),
        ("batchtopk", {}),
        ("gated", {}),
        ("jumprelu", {"target_l0": 4.0, "pre_enc_bias": True}),
    ],
)
def test_round_trip(tmp_path, arch, kw):
    torch.manual_seed(0)
    sae = _make(arch, **kw)
    meta = {"hook": "layers.3.resid_post", "model": "smollm2", "norm_scale_folded": 0.12, "tags": ["a", 1]}
    out = save_sae(sae, tmp_path / "sae", metadata=meta)
    assert sorted(p.name for p in out.iterdir()) == [CFG_FILE, WEIGHTS_FILE]
    loaded = load_sae(out)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.metadata == meta
    assert not loaded.training  # loaded for inference
    want, got = sae.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    x = torch.randn(5, 6)
    sae.eval()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_buffers_are_saved(tmp_path):
    sae = _make("batchtopk")
    save_sae(sae, tmp_path / "b")
    assert load_file(str(tmp_path / "b" / WEIGHTS_FILE))["threshold"].item() == pytest.approx(
        sae.threshold.item()
    )
    tied = _make("relu")
    tied.fold_input_scale(2.0)
    loaded = load_sae(save_sae(tied, tmp_path / "r"))
    assert loaded.enc_scale.item() == pytest.approx(tied.enc_scale.item())


def test_cfg_json_layout(tmp_path):
    save_sae(_make("jumprelu"), tmp_path / "s", metadata={"model": "m"})
    record = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    assert record["arch"] == "jumprelu" and record["format_version"] == FORMAT_VERSION
    assert record["config"]["d_in"] == 6 and record["metadata"] == {"model": "m"}


def test_metadata_defaults_to_sae_metadata_and_must_be_json(tmp_path):
    sae = _make("topk")
    sae.metadata = {"hook": "h"}
    assert load_sae(save_sae(sae, tmp_path / "a")).metadata == {"hook": "h"}
    with pytest.raises(ValueError, match="JSON"):
        save_sae(sae, tmp_path / "b", metadata={"t": torch.zeros(1)})
    assert not (tmp_path / "b").exists()


def test_overwrite_replaces_an_sae_folder_atomically_and_refuses_other_folders(tmp_path):
    first, second = _make("gated"), _make("gated")
    path = save_sae(first, tmp_path / "s")
    save_sae(second, path)
    torch.testing.assert_close(load_sae(path).W_dec, second.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no temporary folders left behind"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="log.txt"):
        save_sae(first, run_dir)
    assert (run_dir / "log.txt").read_text() == "precious"


def test_load_to_device_argument(tmp_path):
    loaded = load_sae(save_sae(_make("relu"), tmp_path / "s"), device="cpu")
    assert loaded.W_dec.device.type == "cpu"


# -- errors ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    return save_sae(_make("topk"), tmp_path / "s")


def _edit_cfg(path, fn):
    record = json.loads((path / CFG_FILE).read_text())
    fn(record)
    (path / CFG_FILE).write_text(json.dumps(record))


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sae(tmp_path / "nope")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_sae(saved)
    (saved / CFG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CFG_FILE):
        load_sae(saved)


def test_unknown_architecture(saved):
    _edit_cfg(saved, lambda r: r.update(arch="nonesuch"))
    with pytest.raises(ValueError, match="nonesuch"):
        load_sae(saved)


def test_unknown_config_keys_are_named(saved):
    _edit_cfg(saved, lambda r: r["config"].update(k_typo=3, another=1))
    with pytest.raises(ValueError, match=r"another.*k_typo"):
        load_sae(saved)


def test_missing_optional_keys_take_defaults_and_missing_required_keys_are_named(saved):
    _edit_cfg(saved, lambda r: r["config"].pop("aux_coeff"))
    assert load_sae(saved).cfg.aux_coeff == pytest.approx(1 / 32)
    _edit_cfg(saved, lambda r: r["config"].pop("width"))
    with pytest.raises(ValueError, match="width"):
        load_sae(saved)


def test_invalid_config_values_are_rejected(saved):
    _edit_cfg(saved, lambda r: r["config"].update(k=0))
    with pytest.raises(ValueError, match="k must"):
        load_sae(saved)


def test_shape_mismatch_between_cfg_and_tensors(saved):
    _edit_cfg(saved, lambda r: r["config"].update(width=12))
    with pytest.raises(ValueError, match=r"shape .*width=12"):
        load_sae(saved)


def test_missing_or_extra_tensors(saved):
    tensors = load_file(str(saved / WEIGHTS_FILE))
    tensors.pop("b_enc")
    tensors["junk"] = torch.zeros(1)
    save_file(tensors, str(saved / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\].*unexpected \['junk'\]"):
        load_sae(saved)


def test_corrupt_files_name_the_file(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\x00garbage, not a safetensors header")
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_sae(saved)
    (saved / CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CFG_FILE):
        load_sae(saved)


def test_newer_format_version_is_refused(saved):
    _edit_cfg(saved, lambda r: r.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format_version"):
        load_sae(saved)
