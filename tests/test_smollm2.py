"""The embedded SmolLM2-135M: loading through the converted-weights cache and hook capture on real text.

One conversion at most per session (module-scoped fixture); the first run on a machine converts the GGUF
(~30 s or more), later runs read the cache.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from saekit.models import ModelUnavailableError, capture, forward_to_hooks, load_model, smollm2_gguf_path

pytestmark = pytest.mark.smollm2

TEXT = (
    "The library is open from nine in the morning until six in the evening. Visitors may borrow up to five "
    "books at a time, and each loan lasts three weeks. Late returns are charged a small fee per day."
)


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except ModelUnavailableError as err:
        pytest.skip(str(err))
    return load_model()


@pytest.fixture(scope="module")
def ids_BT(smollm2) -> torch.Tensor:
    tok = smollm2.tokenizer
    ids = tok(TEXT).input_ids
    assert ids[0] != tok.bos_token_id  # SmolLM2's tokenizer does not add BOS: packing code must
    return torch.tensor([[tok.bos_token_id, *ids]])


def test_loaded_model_shape_and_provenance(smollm2):
    assert (smollm2.d_model, smollm2.n_layers) == (576, 30)
    assert smollm2.name == "smollm2" and smollm2.source.endswith(".gguf")
    assert not smollm2.model.training and not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.file_hash == hashlib.sha256(smollm2_gguf_path().read_bytes()).hexdigest()
    assert smollm2.cache_dir is not None and smollm2.file_hash[:12] in smollm2.cache_dir.name


def test_second_load_hits_the_cache(smollm2):
    again = load_model("smollm2")
    assert again.from_cache and again.cache_dir == smollm2.cache_dir
    emb, emb_again = smollm2.model.get_input_embeddings().weight, again.model.get_input_embeddings().weight
    torch.testing.assert_close(emb_again, emb, rtol=0, atol=0)


def test_capture_matches_output_hidden_states(smollm2, ids_BT):
    model = smollm2.model
    with capture(model, ["layers.15.resid_post"]) as acts, torch.no_grad():
        out = model(ids_BT, output_hidden_states=True)
    ref = out.hidden_states[16]
    assert (acts["layers.15.resid_post"] - ref).abs().max() <= 1e-4
    early = forward_to_hooks(model, ids_BT, ["layers.15.resid_post"])["layers.15.resid_post"]
    assert (early - ref).abs().max() <= 1e-4
    # sanity: a trained model, not noise: the text's next tokens are mostly predicted well above chance
    logp = torch.log_softmax(out.logits[0, :-1], dim=-1).gather(1, ids_BT[0, 1:, None])
    assert logp.mean() > -6.0  # uniform over 49,152 tokens would be about -10.8
