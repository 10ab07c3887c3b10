"""KVCache: preallocated buffers, growth, row selection, cropping, and its use by the model."""

from __future__ import annotations

import pytest
import torch

from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, KVCache

CONFIG = GPTNeoXJapaneseConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_multiple_size=2,
    rotary_pct=0.5,
    bos_token_id=1,
    eos_token_id=2,
)


def kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 8, generator=g), torch.randn(batch, 2, length, 8, generator=g)


@pytest.fixture(scope="module")
def model() -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(0)
    return GPTNeoXJapaneseForCausalLM(CONFIG).eval()


def test_update_writes_in_place_and_returns_views() -> None:
    cache = KVCache(CONFIG, batch_size=3, max_length=8)
    buffer = cache.keys[1]
    k1, v1 = kv(3, 5, 0)
    keys, values = cache.update(1, k1, v1)
    assert torch.equal(keys, k1) and torch.equal(values, v1)
    assert keys.data_ptr() == buffer.data_ptr()  # a view of the preallocated buffer
    assert cache.get_seq_length() == 0  # the model advances once per forward, not per layer
    cache.advance(5)
    k2, v2 = kv(3, 2, 1)
    keys, values = cache.update(1, k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, torch.cat([v1, v2], dim=2))
    assert cache.keys[1] is buffer and cache.capacity == 8


def test_growth_doubles_and_keeps_the_content() -> None:
    cache = KVCache(CONFIG, batch_size=1, max_length=4)
    stored = []
    for step in range(6):
        k, v = kv(1, 3, step)
        stored.append(k)
        for layer in range(2):
            keys, _ = cache.update(layer, k, v)
        cache.advance(3)
        assert torch.equal(keys, torch.cat(stored, dim=2))
    assert cache.get_seq_length() == 18
    assert cache.capacity == 32  # 4 -> 8 -> 16 -> 32


def test_reset_crop_select_reorder() -> None:
    cache = KVCache(CONFIG, batch_size=3, max_length=10)
    k, v = kv(3, 6, 0)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.advance(6)
    cache.crop(4)
    assert cache.get_seq_length() == 4
    cache.crop(-1)
    assert cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-5)
    cache.select([2, 0])
    assert cache.batch_size == 2 and cache.keys[0].shape[0] == 2
    assert torch.equal(cache.keys[0][:, :, :3], k[[2, 0], :, :3])
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.values[1][:, :, :3], v[[0, 0], :, :3])
    with pytest.raises(IndexError, match="out of range"):
        cache.select([2])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.capacity == 10


def test_shape_errors_name_the_shapes() -> None:
    cache = KVCache(CONFIG, batch_size=2, max_length=4)
    k, v = kv(3, 1, 0)
    with pytest.raises(ValueError, match=r"batch=2.*got key of shape \(3, 2, 1, 8\)"):
        cache.update(0, k, v)
    with pytest.raises(ValueError, match="same 4-d shape"):
        cache.update(0, k[:2], v[:2, :, :0])
    with pytest.raises(ValueError, match="max_length > 0"):
        KVCache(CONFIG, batch_size=1, max_length=0)


@torch.no_grad()
def test_model_decodes_into_preallocated_buffers(model: GPTNeoXJapaneseForCausalLM) -> None:
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache.from_config(CONFIG, batch_size=2, max_length=12)
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    out = model(ids[:, :4], past_key_values=cache)
    assert out.past_key_values is cache
    steps = [out.logits]
    for t in range(4, 12):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert [t.data_ptr() for t in cache.keys + cache.values] == pointers
    assert (torch.cat(steps, dim=1) - model(ids).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_crop_then_continue_equals_a_fresh_run(model: GPTNeoXJapaneseForCausalLM) -> None:
    """What speculative decoding does: roll the cache back and feed different tokens."""
    ids = torch.randint(3, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    other = torch.randint(3, 50, (1, 3), generator=torch.Generator().manual_seed(2))
    cache = model(ids, use_cache=True).past_key_values
    cache.crop(6)
    rolled = model(other, past_key_values=cache).logits
    fresh = model(torch.cat([ids[:, :6], other], dim=1)).logits[:, 6:]
    assert (rolled - fresh).abs().max() <= 1e-5


@torch.no_grad()
def test_select_rows_then_continue(model: GPTNeoXJapaneseForCausalLM) -> None:
    ids = torch.randint(3, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    cache = model(ids[:, :6], use_cache=True).past_key_values
    cache.select([2, 0])
    step = model(ids[[2, 0], 6:], past_key_values=cache).logits
    assert (step - model(ids[[2, 0]]).logits[:, 6:]).abs().max() <= 1e-5


def test_model_rejects_other_cache_types(model: GPTNeoXJapaneseForCausalLM) -> None:
    with pytest.raises(TypeError, match="neoxja.KVCache"):
        model(torch.ones(1, 2, dtype=torch.long), past_key_values=((torch.zeros(1),),))


def test_reorder_gathers_rows_in_place_like_index_select() -> None:
    """Beam search's reorder: the rows of index_select over the filled positions, written into the same
    buffers (a decoder holding their pointers keeps working), rows beyond the filled length untouched."""
    cache = KVCache(CONFIG, batch_size=4, max_length=10)
    k, v = kv(4, 10, 3)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.advance(6)
    buffers = list(cache.keys) + list(cache.values)
    pointers = [t.data_ptr() for t in buffers]
    before = [t.clone() for t in buffers]
    # Row 2 continues twice and is overwritten itself, row 3 keeps its place; then rows 1 and 3 swap
    # (targets that are not consecutive).
    for order in ([2, 2, 0, 3], [0, 3, 2, 1]):
        cache.reorder(torch.tensor(order))
        assert all(a is b for a, b in zip(cache.keys + cache.values, buffers, strict=True))
        assert [t.data_ptr() for t in cache.keys + cache.values] == pointers
        expected = [old.index_select(0, torch.tensor(order)) for old in before]
        for old, want, new in zip(before, expected, cache.keys + cache.values, strict=True):
            assert torch.equal(new[:, :, :6], want[:, :, :6])
            assert torch.equal(new[:, :, 6:], old[:, :, 6:])  # past the filled length nothing is moved
        before = [
            torch.cat((want[:, :, :6], old[:, :, 6:]), dim=2)
            for old, want in zip(before, expected, strict=True)
        ]
    assert cache.batch_size == 4 and cache.get_seq_length() == 6


def test_reorder_rejects_another_batch_size_or_rows_out_of_range() -> None:
    cache = KVCache(CONFIG, batch_size=3, max_length=4)
    with pytest.raises(ValueError, match=r"3 integers.*use select\(\)"):
        cache.reorder([0, 1])
    with pytest.raises(IndexError, match="out of range"):
        cache.reorder([0, 1, 3])


@torch.no_grad()
def test_reorder_then_continue_equals_the_reordered_prompts(model: GPTNeoXJapaneseForCausalLM) -> None:
    ids = torch.randint(3, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    cache = KVCache(CONFIG, batch_size=3, max_length=9)
    model(ids[:, :6], past_key_values=cache, use_cache=True)
    order = [1, 1, 0]
    cache.reorder(order)
    stepped = model(ids[order, 6:], past_key_values=cache, use_cache=True).logits
    full = model(ids[order]).logits[:, 6:]
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def test_reorder_of_a_lazy_cache_moves_its_adopted_buffers() -> None:
    """A cache made without max_length holds the first forward's tensors (no single allocation yet):
    reorder moves their rows the same way, and after growing the content is still in place."""
    cache = KVCache(CONFIG, batch_size=3, max_length=None)
    k, v = kv(3, 4, 7)
    for layer in range(2):
        cache.update(layer, k.clone(), v.clone())  # each layer adopts its own tensors, as in the model
    cache.advance(4)
    adopted = cache.keys[1]
    moved_k, moved_v = k[[1, 0, 0]], v[[1, 0, 0]]
    cache.reorder([1, 0, 0])
    assert cache.keys[1] is adopted and torch.equal(cache.keys[1], moved_k)
    k2, v2 = kv(3, 1, 8)
    keys, values = cache.update(1, k2, v2)  # grows into one allocation
    assert torch.equal(keys, torch.cat((moved_k, k2), dim=2))
    assert torch.equal(values, torch.cat((moved_v, v2), dim=2))


def test_fill_repeated_gives_each_row_to_its_copies() -> None:
    """Beam search runs each prompt once: fill_repeated copies row r of the prompt cache into rows
    r * repeats ... r * repeats + repeats - 1 of the beam cache, in its own buffers."""
    config = type("Config", (), dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=8))()
    source = KVCache(config, 2, 5)
    for layer in range(2):
        source.update(layer, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    source.advance(3)
    beams = KVCache(config, 6, 10)
    keys = beams.keys[0]
    beams.fill_repeated(source, 3)
    assert beams.length == 3 and beams.keys[0] is keys
    for layer in range(2):
        for buffers, originals in ((beams.keys, source.keys), (beams.values, source.values)):
            expected = originals[layer][:, :, :3].repeat_interleave(3, dim=0)
            assert torch.equal(buffers[layer][:, :, :3], expected)
    with pytest.raises(ValueError, match="cannot hold"):
        KVCache(config, 4, 10).fill_repeated(source, 3)
