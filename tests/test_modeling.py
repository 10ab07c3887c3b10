"""The network against transformers: tiny random models saved by transformers, loaded by neoxja."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseModel, KVCache

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_multiple_size=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
# head_dim 16; rotary_pct 0.5 rotates 8 dims (4 frequencies, hence 4 longrope factors).
CONFIGS = {
    "partial-gelu-tied": dict(rotary_pct=0.5),
    "full-untied-gelu_new": dict(rotary_pct=1.0, tie_word_embeddings=False, hidden_act="gelu_new"),
    "linear-silu": dict(
        rotary_pct=0.25, hidden_act="silu", rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "dynamic-relu": dict(
        rotary_pct=0.5,
        hidden_act="relu",
        max_position_embeddings=8,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
    "yarn": dict(
        rotary_pct=0.5,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ),
    "longrope-untied": dict(
        rotary_pct=0.5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [2.0, 3.0, 4.0, 5.0],
            "original_max_position_embeddings": 8,
        },
    ),
    "llama3-gelu_pytorch_tanh": dict(
        rotary_pct=0.5,
        hidden_act="gelu_pytorch_tanh",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
}
# Rope types whose frequencies do not depend on the current length, so a cache equals a full pass.
STATIC_ROPE = ["partial-gelu-tied", "full-untied-gelu_new", "linear-silu", "yarn", "llama3-gelu_pytorch_tanh"]


def make_reference(name: str, seed: int = 0) -> transformers.GPTNeoXJapaneseForCausalLM:
    """A transformers model of config ``name`` with every weight (biases, norms too) randomised."""
    torch.manual_seed(seed)
    config = transformers.GPTNeoXJapaneseConfig(**{**BASE, **CONFIGS[name]})
    model = transformers.GPTNeoXJapaneseForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(transformers model, neoxja model loaded from what transformers saved, config name)."""
    reference = make_reference(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return reference, GPTNeoXJapaneseForCausalLM.from_pretrained(directory), request.param


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_logits_hidden_states_attentions_and_loss_match(pair: tuple) -> None:
    reference, ours, _ = pair
    x = ids()
    labels = x.clone()
    labels[0, :3] = -100
    theirs = reference(x, labels=labels, output_hidden_states=True, output_attentions=True)
    mine = ours(x, labels=labels, output_hidden_states=True, output_attentions=True)
    assert maxdiff(mine.logits, theirs.logits) <= TOL
    assert len(mine.hidden_states) == len(theirs.hidden_states) == BASE["num_hidden_layers"] + 1
    for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
        assert maxdiff(a, b) <= TOL
    for a, b in zip(mine.attentions, theirs.attentions, strict=True):
        assert a.shape == b.shape and maxdiff(a, b) <= TOL
    assert abs(mine.loss.item() - theirs.loss.item()) <= TOL
    # The SDPA path (no weights asked for) computes the same logits.
    assert maxdiff(ours(x).logits, theirs.logits) <= TOL


@torch.no_grad()
def test_bare_model_matches(pair: tuple, tmp_path: Path) -> None:
    reference, _, _ = pair
    reference.save_pretrained(tmp_path)
    bare = GPTNeoXJapaneseModel.from_pretrained(tmp_path)
    x = ids()
    expected = reference.gpt_neox_japanese(x).last_hidden_state
    assert maxdiff(bare(x).last_hidden_state, expected) <= TOL
    assert maxdiff(bare(x, return_dict=False)[0], expected) <= TOL


@pytest.mark.parametrize("name", STATIC_ROPE)
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(name: str, tmp_path: Path) -> None:
    reference = make_reference(name)
    reference.save_pretrained(tmp_path)
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    x = ids(length=14)
    full = reference(x).logits
    out = ours(x[:, :5], use_cache=True)
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(5, 9):  # one token at a time
        out = ours(x[:, t : t + 1], past_key_values=cache)
        steps.append(out.logits)
    out = ours(x[:, 9:], past_key_values=cache)  # a chunk on top of a filled cache
    steps.append(out.logits)
    assert cache.get_seq_length() == 14
    assert maxdiff(torch.cat(steps, dim=1), full) <= TOL


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return input_ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", ["partial-gelu-tied", "yarn"])
@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(name: str, tmp_path: Path) -> None:
    reference = make_reference(name)
    reference.save_pretrained(tmp_path)
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    rows = [ids(1, n, seed=n)[0] for n in (7, 4, 2)]
    nxt = ids(3, 3, seed=99)
    input_ids, mask = left_pad(rows)
    out = ours(input_ids, attention_mask=mask, position_ids=positions(mask))
    theirs = reference(input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    batch_logits = [out.logits]
    cache = out.past_key_values
    for t in range(nxt.shape[1]):  # then decode three tokens per row with the cache
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        pos = positions(mask)[:, -1:]
        step = ours(nxt[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=cache)
        batch_logits.append(step.logits)
    batch_logits = torch.cat(batch_logits, dim=1)
    for i, row in enumerate(rows):
        alone = ours(torch.cat([row, nxt[i]])[None]).logits[0]
        real = batch_logits[i, -(len(row) + 3) :]
        assert maxdiff(real, alone) <= TOL
        assert maxdiff(theirs[i, -len(row) :], alone[: len(row)]) <= TOL


@torch.no_grad()
def test_right_padding_leaves_real_positions_alone(pair: tuple) -> None:
    reference, ours, name = pair
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    out = ours(x, attention_mask=mask).logits
    theirs = reference(x, attention_mask=mask).logits
    assert maxdiff(out[0], theirs[0]) <= TOL and maxdiff(out[1, :6], theirs[1, :6]) <= TOL
    if name in STATIC_ROPE:  # dynamic/longrope frequencies depend on the padded length itself
        assert maxdiff(out[1, :6], ours(x[1:, :6]).logits[0]) <= TOL


@torch.no_grad()
def test_output_access_and_tuples(pair: tuple) -> None:
    reference, ours, _ = pair
    x = ids()
    out = ours(x, labels=x, use_cache=False)
    assert out["logits"] is out.logits and out[1] is out.logits and out[0] is out.loss
    assert out.past_key_values is None and "past_key_values" not in out
    with pytest.raises(KeyError):
        out["attentions"]
    assert len(out.to_tuple()) == 2
    plain = ours(x, labels=x, use_cache=False, return_dict=False)
    theirs = reference(x, labels=x, use_cache=False, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == len(theirs) == 2
    assert maxdiff(plain[1], theirs[1]) <= TOL
    cached = ours(x)
    assert isinstance(cached.past_key_values, KVCache)
    assert cached.past_key_values.get_seq_length() == x.shape[1]
    assert cached.keys() == ["logits", "past_key_values"]


@torch.no_grad()
def test_logits_to_keep_and_inputs_embeds(pair: tuple) -> None:
    _, ours, _ = pair
    x = ids()
    full = ours(x).logits
    assert maxdiff(ours(x, logits_to_keep=1).logits, full[:, -1:]) <= TOL
    assert maxdiff(ours(x, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]]) <= TOL
    embeds = ours.get_input_embeddings()(x)
    assert maxdiff(ours(inputs_embeds=embeds).logits, full) <= TOL
    with pytest.raises(ValueError, match="exactly one"):
        ours(x, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours(x, attention_mask=torch.ones(2, 3))


@torch.no_grad()
def test_head_mask_scales_attention_weights() -> None:
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**BASE)).eval()
    x = ids()
    plain = model(x, output_attentions=True)
    ones = model(x, head_mask=torch.ones(2, 4))
    assert maxdiff(ones.logits, plain.logits) <= TOL
    head_mask = torch.ones(2, 4)
    head_mask[1, 2] = 0
    masked = model(x, head_mask=head_mask, output_attentions=True)
    assert masked.attentions[1][:, 2].abs().max() == 0
    assert maxdiff(masked.attentions[0], plain.attentions[0]) <= TOL
    assert maxdiff(masked.logits, plain.logits) > 1e-4
    with pytest.raises(ValueError, match="head_mask must have shape"):
        model(x, head_mask=torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_scores_do_not_overflow(dtype: torch.dtype) -> None:
    """q·k far above float16's range (65504): both attention paths stay finite."""
    torch.manual_seed(0)
    config = GPTNeoXJapaneseConfig(**BASE)
    model = GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.gpt_neox_japanese.layers:
            layer.attention.query_key_value.weight.mul_(300.0)
    reference = model(ids(), output_attentions=True)
    model.to(dtype)
    for kwargs in ({}, {"output_attentions": True}):
        out = model(ids(), **kwargs)
        assert torch.isfinite(out.logits).all()
    weights = model(ids(), output_attentions=True).attentions[0].float()
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-2)
    assert torch.isfinite(reference.logits).all()


def test_dropout_only_in_training() -> None:
    config = GPTNeoXJapaneseConfig(**BASE, hidden_dropout=0.2)
    model = GPTNeoXJapaneseForCausalLM(config)
    x = ids()
    assert model.training  # like nn.Module (and transformers before from_pretrained)
    assert maxdiff(model(x).logits, model(x).logits) > 0
    model.eval()
    assert maxdiff(model(x).logits, model(x).logits) == 0
    with torch.no_grad():
        assert model(x).past_key_values is not None  # eval uses the cache by default
    model.train()
    out = model(x, labels=x)
    assert out.past_key_values is None  # training does not fill a cache unless asked
    out.loss.backward()
    assert model.gpt_neox_japanese.layers[-1].attention.dense_bias.grad is not None


def test_init_weights_and_conveniences(pair: tuple) -> None:
    reference, ours, _ = pair
    config = GPTNeoXJapaneseConfig(**BASE, initializer_range=0.5)
    fresh = GPTNeoXJapaneseForCausalLM(config)
    layer = fresh.gpt_neox_japanese.layers[-1]
    assert abs(layer.mlp.dense_h_to_4h.weight.std().item() - 0.5) < 0.05
    assert abs(fresh.gpt_neox_japanese.embed_in.weight.std().item() - 0.5) < 0.05
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
    assert torch.equal(layer.attention.dense_bias, torch.zeros(64))
    assert fresh.gpt_neox_japanese.layers[0].attention.dense_bias is None
    assert set(fresh.state_dict()) == set(reference.state_dict())

    assert ours.num_parameters() == reference.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == reference.num_parameters(exclude_embeddings=True)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert not ours.training
    assert ours.get_output_embeddings() is ours.embed_out
    tied = ours.config.tie_word_embeddings
    assert (ours.embed_out.weight is ours.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("name", ["partial-gelu-tied", "longrope-untied"])
@torch.no_grad()
def test_neoxja_saves_transformers_loads(name: str, tmp_path: Path) -> None:
    reference = make_reference(name)
    reference.save_pretrained(tmp_path / "theirs")
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = ids()
    assert maxdiff(back(x).logits, ours(x).logits) <= TOL
    assert maxdiff(back(x).logits, reference(x).logits) <= TOL
    assert back.config.tie_word_embeddings == ours.config.tie_word_embeddings


def test_token_id_outside_the_vocabulary_is_named_with_its_position() -> None:
    config = GPTNeoXJapaneseConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = GPTNeoXJapaneseForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"token id 100 at position \(1, 2\).*\[0, 100\)"):
        model(torch.tensor([[1, 2, 3], [4, 5, 100]]))
    with pytest.raises(ValueError, match=r"token id -1 at position \(0, 0\)"):
        model(torch.tensor([[-1, 2]]))
