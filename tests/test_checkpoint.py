"""Loading and saving weights: every file layout transformers uses, the Hub cache, dtypes, errors."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseModel
from neoxja.checkpoint import CheckpointError
from neoxja.hub import HubUnavailableError
from neoxja.saving import parse_size

transformers = pytest.importorskip("transformers")

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_multiple_size=2,
    rotary_pct=0.5,
    bos_token_id=1,
    eos_token_id=2,
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
X = torch.arange(3, 13).view(1, 10)


@pytest.fixture(scope="module")
def reference() -> transformers.GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(0)
    model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**CONFIG))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def expected(reference: transformers.GPTNeoXJapaneseForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return reference(X).logits


@pytest.fixture
def saved(reference: transformers.GPTNeoXJapaneseForCausalLM, tmp_path: Path) -> Path:
    reference.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def logits(model: GPTNeoXJapaneseForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits.float()


def state_of(directory: Path) -> dict[str, torch.Tensor]:
    return state_of_file(directory / "model.safetensors")


def state_of_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def write_bin_shards(state: dict[str, torch.Tensor], directory: Path) -> None:
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, directory / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_every_layout_loads_to_reference_logits(
    layout: str, reference: transformers.GPTNeoXJapaneseForCausalLM, expected: torch.Tensor, tmp_path: Path
) -> None:
    directory = tmp_path / layout
    if layout == "sharded-safetensors":
        reference.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").is_file()
    else:
        reference.save_pretrained(directory)
    if layout.endswith("bin"):
        state = state_of(directory)
        (directory / "model.safetensors").unlink()
        if layout == "bin":
            torch.save(state, directory / "pytorch_model.bin")
        else:
            write_bin_shards(state, directory)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(directory)
    assert not model.training
    assert (logits(model) - expected).abs().max() <= 1e-5


def test_hub_id_from_an_offline_cache(
    saved: Path, expected: torch.Tensor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-neox-ja"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(saved, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", cache_dir=cache)
    assert (logits(model) - expected).abs().max() <= 1e-5
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    from_env_cache = GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja")
    assert (logits(from_env_cache) - expected).abs().max() <= 1e-5
    with pytest.raises(HubUnavailableError, match="not reachable"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("someone/not-cached", cache_dir=cache)
    (repo / "snapshots" / COMMIT / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no weights found.*model.safetensors.*pytorch_model.bin.index.json"):
        GPTNeoXJapaneseForCausalLM.from_pretrained("someone/tiny-neox-ja", cache_dir=cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "float16", torch.float64])
def test_dtype_argument(saved: Path, expected: torch.Tensor, dtype: torch.dtype | str) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, dtype=dtype)
    wanted = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert model.dtype == wanted
    assert all(p.dtype == wanted for p in model.parameters())
    assert model.gpt_neox_japanese.rotary_emb.inv_freq.dtype == torch.float32
    assert (logits(model) - expected).abs().max() <= (1e-5 if wanted == torch.float64 else 0.1)


def test_auto_dtype_follows_the_config(
    reference: transformers.GPTNeoXJapaneseForCausalLM, tmp_path: Path
) -> None:
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    legacy_name = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert legacy_name.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype='int8'"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype="int8")


def test_bare_and_causal_checkpoints_load_into_each_other(
    reference: transformers.GPTNeoXJapaneseForCausalLM, saved: Path, tmp_path: Path
) -> None:
    bare = GPTNeoXJapaneseModel.from_pretrained(saved)  # the LM head is skipped
    with torch.no_grad():
        hidden = reference.gpt_neox_japanese(X).last_hidden_state
        assert (bare(X).last_hidden_state - hidden).abs().max() <= 1e-5
    bare.save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("gpt_neox_japanese.") for k in state_of(tmp_path / "bare"))
    full = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "bare")  # tied head comes from embed_in
    assert (logits(full) - logits(GPTNeoXJapaneseForCausalLM.from_pretrained(saved))).abs().max() <= 1e-5


def test_stale_buffers_of_old_checkpoints_are_ignored(saved: Path, expected: torch.Tensor) -> None:
    state = state_of(saved)
    state["gpt_neox_japanese.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    state["gpt_neox_japanese.layers.0.attention.masked_bias"] = torch.tensor(-1e4)
    state["gpt_neox_japanese.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    save_file(state, saved / "model.safetensors")
    assert (logits(GPTNeoXJapaneseForCausalLM.from_pretrained(saved)) - expected).abs().max() <= 1e-5


def test_save_is_loaded_by_transformers_and_drops_the_tied_copy(saved: Path, tmp_path: Path) -> None:
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    ours.save_pretrained(tmp_path / "out")
    assert "embed_out.weight" not in state_of(tmp_path / "out")
    back = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(X).logits - logits(ours)).abs().max() <= 1e-5
    # Saving again with shards replaces the single file instead of mixing the two.
    ours.save_pretrained(tmp_path / "out", max_shard_size=20_000)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert torch.equal(logits(GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "out")), logits(ours))
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert torch.equal(logits(GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "bin")), logits(ours))


def test_progress_bar_counts_every_tensor(
    saved: Path, expected: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, progress=True)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    count = len(state_of(saved))
    assert f"{count}/{count}" in capsys.readouterr().err
    GPTNeoXJapaneseForCausalLM.from_pretrained(saved)  # a tiny checkpoint shows no bar by default
    assert "loading weights" not in capsys.readouterr().err


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        parse_size("lots")


# ----- errors ---------------------------------------------------------------------------------------


def test_missing_config_and_missing_weights(saved: Path) -> None:
    (saved / "config.json").unlink()
    with pytest.raises(OSError, match="config.json"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    config = GPTNeoXJapaneseConfig(**CONFIG)
    (saved / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors, model.safetensors.index.json, pytorch_model.bin, "):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, config=config)


def test_missing_shard_is_named(reference: transformers.GPTNeoXJapaneseForCausalLM, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(OSError, match="shard 'model-00002-of-"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_truncated_and_corrupt_safetensors(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated safetensors file: tensor '.*' ends at byte"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header, as a damaged or hostile writer could make it."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "header, data, problem",
    [
        (  # two tensors sharing bytes
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "invalid offset",
        ),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "integer `-2`"),
        ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, 8, "floating point"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "invalid offset"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "not fully covered"),
    ],
    ids=["overlap", "negative-shape", "fractional-shape", "gap", "trailing-bytes"],
)
def test_safetensors_the_library_refuses_are_refused(
    saved: Path, header: dict, data: int, problem: str
) -> None:
    path = saved / "model.safetensors"
    write_raw_safetensors(path, header, bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt safetensors header.*{problem}"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_deeply_nested_header_is_an_error_not_a_recursion_crash(saved: Path) -> None:
    path = saved / "model.safetensors"
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_dtype_neoxja_cannot_read_is_named(saved: Path) -> None:
    path = saved / "model.safetensors"
    write_raw_safetensors(path, {"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError, match="tensor 'a' has dtype U16, which neoxja does not read"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("kind", [torch.int32, torch.bool, torch.uint8])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_integer_or_bool_tensor_for_a_float_weight_names_file_and_key(
    saved: Path, kind: torch.dtype, fmt: str
) -> None:
    state = state_of(saved)
    key = "gpt_neox_japanese.layers.0.attention.dense.weight"
    state[key] = torch.ones_like(state[key]).to(kind)
    (saved / "model.safetensors").unlink()
    path = saved / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    message = f"{path}: {key} holds {kind} values where the model has a floating-point weight"
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_shard_index_naming_a_path_outside_the_directory_is_refused(saved: Path, shard: str) -> None:
    (saved / "model.safetensors").rename(saved.parent / "outside.safetensors")
    index = {"weight_map": {"gpt_neox_japanese.embed_in.weight": shard}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which is not a file name inside"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("index", ['{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}', "[]", "{oops"])
def test_damaged_shard_index_names_the_file(saved: Path, index: str) -> None:
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_config_json_that_is_not_utf8_names_the_file(saved: Path, encoding: str) -> None:
    config = saved / "config.json"
    text = config.read_text(encoding="utf-8").replace('"model_type"', '"note": "\u00e9t\u00e9", "model_type"')
    config.write_bytes(json.dumps(json.loads(text), ensure_ascii=False).encode(encoding))
    with pytest.raises(ValueError, match=f"{config}:1: not UTF-8 text"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match=f"{config}:1: not UTF-8 text"):
        GPTNeoXJapaneseConfig.from_pretrained(saved)


def test_shape_mismatch_names_key_and_shapes(saved: Path) -> None:
    state = state_of(saved)
    state["gpt_neox_japanese.layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(32, 60)
    save_file(state, saved / "model.safetensors")
    message = r"layers\.1\.mlp\.dense_4h_to_h\.weight: checkpoint has \[32, 60\].*expects \[32, 64\]"
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_missing_and_unexpected_keys_are_listed(saved: Path, expected: torch.Tensor) -> None:
    state = state_of(saved)
    del state["gpt_neox_japanese.layers.0.post_attention_layernorm.bias"]
    state["gpt_neox_japanese.layers.0.extra.weight"] = torch.zeros(3)
    save_file(state, saved / "model.safetensors")
    message = "missing keys: .*post_attention_layernorm.bias; unexpected keys: .*extra.weight"
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    loose = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, strict=False)
    assert torch.equal(loose.gpt_neox_japanese.layers[0].post_attention_layernorm.bias, torch.zeros(32))


def test_pickle_that_needs_code_is_refused(saved: Path, tmp_path: Path) -> None:
    state = state_of(saved)
    (saved / "model.safetensors").unlink()
    torch.save({**state, "hook": pickle.loads(pickle.dumps(Path("x")))}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refusing to load it"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    (saved / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_values_float16_cannot_hold_are_an_error(saved: Path) -> None:
    state = state_of(saved)
    state["gpt_neox_japanese.layers.0.mlp.dense_4h_to_h.weight"][0, 0] = 1e6
    save_file(state, saved / "model.safetensors")
    message = r"dense_4h_to_h.weight: values up to 1e\+06 do not fit in torch.float16"
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, dtype=torch.float16)
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_unknown_keyword_and_config_overrides(saved: Path) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, bogus=1)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, output_hidden_states=True)
    with torch.no_grad():
        assert len(model(X).hidden_states) == 3


def test_memory_mapped_weights_survive_saving_over_their_file(saved: Path, expected: torch.Tensor) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved)  # float32 file, float32 model: mapped
    model.save_pretrained(saved, max_shard_size="30KB")  # replaces model.safetensors with shards
    assert not (saved / "model.safetensors").exists()
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert (logits(GPTNeoXJapaneseForCausalLM.from_pretrained(saved)) - expected).abs().max() <= 1e-5
    with torch.no_grad():  # copy-on-write: the weights are writable, the file is not touched
        model.gpt_neox_japanese.embed_in.weight.add_(1.0)
    assert (logits(GPTNeoXJapaneseForCausalLM.from_pretrained(saved)) - expected).abs().max() <= 1e-5


def test_config_argument_object_or_path(saved: Path, expected: torch.Tensor) -> None:
    config = GPTNeoXJapaneseConfig.from_pretrained(saved)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, config=config, output_attentions=True)
    assert model.config.output_attentions and not config.output_attentions  # the caller's config is kept
    assert (logits(model) - expected).abs().max() <= 1e-5
    by_path = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, config=str(saved))
    assert (logits(by_path) - expected).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="config must be"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, config={"hidden_size": 32})


@pytest.mark.parametrize("device", [-1, "cpu", "auto", torch.device("cpu")])
def test_device_forms_of_the_shared_policy(saved: Path, expected: torch.Tensor, device: object) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, device=device)
    assert model.device.type == "cpu"  # this machine has no GPU: "auto" is the CPU
    torch.testing.assert_close(logits(model), expected)
    assert GPTNeoXJapaneseForCausalLM.from_pretrained(saved, device_map=device).device.type == "cpu"


@pytest.mark.parametrize("device", ["mps", "meta", "banana", 0, "cuda:3", 1.5])
def test_device_this_machine_lacks_is_named(
    saved: Path, device: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"device={device!r}.*available here: 'auto', 'cpu', -1"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, device=device)


# ----- every tensor from one place, and nothing the model does not know --------------------------------


def sharded(reference: transformers.GPTNeoXJapaneseForCausalLM, directory: Path) -> tuple[Path, Path]:
    """``reference`` saved in two or more shards; (first shard, second shard)."""
    reference.save_pretrained(directory, max_shard_size="20KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    return shards[0], shards[1]


def test_a_tensor_outside_the_index_is_refused_not_taken(
    reference: transformers.GPTNeoXJapaneseForCausalLM, tmp_path: Path
) -> None:
    first, second = sharded(reference, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k, shard in index.items() if shard == first.name)
    extra = state_of_file(second)
    extra[key] = torch.zeros_like(state_of_file(first)[key])  # would override the indexed tensor
    save_file(extra, second)
    with pytest.raises(CheckpointError, match=rf"{second}: tensor '{key}' is listed in .*under shard"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    extra["gpt_neox_japanese.layers.0.attention.extra"] = torch.zeros(2)
    del extra[key]
    save_file(extra, second)
    with pytest.raises(
        CheckpointError, match=r"tensor 'gpt_neox_japanese.layers.0.attention.extra' is not in"
    ):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_the_same_tensor_in_two_shards_and_a_tensor_the_index_invents(
    reference: transformers.GPTNeoXJapaneseForCausalLM, tmp_path: Path
) -> None:
    first, second = sharded(reference, tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, shard in index["weight_map"].items() if shard == first.name)
    both = state_of_file(second)
    both[key] = state_of_file(first)[key]
    save_file(both, second)
    for shard in (first.name, second.name):  # whichever shard the index names, the other one has it too
        index["weight_map"][key] = shard
        index_path.write_text(json.dumps(index))
        other = second if shard == first.name else first
        with pytest.raises(
            CheckpointError, match=rf"{other}: tensor '{key}' is listed in .* under shard '{shard}'"
        ):
            GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    del both[key]
    save_file(both, second)
    index["weight_map"][key] = first.name
    index["weight_map"]["gpt_neox_japanese.layers.0.invented"] = second.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"lists tensor 'gpt_neox_japanese.layers.0.invented' in '{second.name}'"
    ):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)


def test_bin_shards_are_held_to_their_index_too(saved: Path) -> None:
    state = state_of(saved)
    (saved / "model.safetensors").unlink()
    write_bin_shards(state, saved)
    second = saved / "pytorch_model-00002-of-00002.bin"
    shard = torch.load(second, weights_only=True)
    shard["gpt_neox_japanese.embed_in.weight"] = state["gpt_neox_japanese.embed_in.weight"]
    torch.save(shard, second)
    with pytest.raises(CheckpointError, match=r"tensor 'gpt_neox_japanese.embed_in.weight'"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_a_key_twice_in_one_header_or_under_two_names_is_refused(saved: Path) -> None:
    path = saved / "model.safetensors"
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = ('{"a": ' + json.dumps(entry) + ', "a": ' + json.dumps(entry) + "}").encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(4))
    with pytest.raises(CheckpointError, match=rf"{path}: the header names 'a' twice"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_one_weight_under_a_prefixed_and_a_bare_name_is_refused(saved: Path) -> None:
    state = state_of(saved)
    state["embed_in.weight"] = torch.zeros_like(state["gpt_neox_japanese.embed_in.weight"])
    save_file(state, saved / "model.safetensors")
    name = r"(gpt_neox_japanese\.)?embed_in\.weight"
    message = (
        rf"model.safetensors: {name} and {name} are both the model's gpt_neox_japanese\.embed_in\.weight"
    )
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


UNEXPECTED = "model.safetensors: does not match the model: unexpected keys: "


@pytest.mark.parametrize(
    "key, refusal",
    [
        ("gpt_neox_japanese.layers.1.attention.rotary_emb.inv_freq", None),
        ("gpt_neox_japanese.layers.1.attention.masked_bias", None),
        ("gpt_neox_japanese.rotary_emb.inv_freq", None),  # transformers 5's buffer, were it ever saved
        # a layer the model does not have: its number of layers does not fit the config
        ("gpt_neox_japanese.layers.2.attention.bias", "the checkpoint has layers 0 to 2"),
        ("gpt_neox_japanese.layers.0.mlp.bias", UNEXPECTED + "gpt_neox_japanese.layers.0.mlp.bias"),
        (
            "gpt_neox_japanese.layers.0.attention.dense.rotary_emb.inv_freq",
            UNEXPECTED + "gpt_neox_japanese.layers.0.attention.dense.rotary_emb.inv_freq",
        ),
        ("rotary_emb.inv_freq.extra", UNEXPECTED + "rotary_emb.inv_freq.extra"),
    ],
)
def test_strict_loading_accepts_only_the_known_stale_buffers(
    saved: Path, key: str, refusal: str | None
) -> None:
    state = state_of(saved)
    state[key] = torch.ones(2)
    save_file(state, saved / "model.safetensors")
    if refusal is None:
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
        return
    with pytest.raises(CheckpointError, match=refusal):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    GPTNeoXJapaneseForCausalLM.from_pretrained(saved, strict=False)  # ignored when asked to be lenient


# ----- the config against the weights, before anything is built ---------------------------------------


def write_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_hidden_layers": 3},
            r"model.safetensors: the checkpoint has layers 0 to 1 \(2 layers\), "
            r"the config's num_hidden_layers is 3",
        ),
        (
            {"num_hidden_layers": 1},
            r"the checkpoint has layers 0 to 1 \(2 layers\), the config's num_hidden_layers is 1",
        ),
        (
            {"hidden_size": 48},
            r"embed_in.weight has shape \[64, 32\], the config's hidden_size=48 needs \[64, 48\]",
        ),
        (
            {"vocab_size": 65},
            r"embed_in.weight has shape \[64, 32\], the config's vocab_size=65 needs \[65, 32\]",
        ),
        (
            {"intermediate_multiple_size": 3},
            r"dense_h_to_4h.weight has shape \[64, 32\], the config's intermediate_multiple_size=3",
        ),
    ],
)
def test_a_config_that_does_not_describe_the_weights_is_named(
    saved: Path, changes: dict, message: str
) -> None:
    write_config(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_more_layers_than_the_weights_load_only_when_not_strict(saved: Path, expected: torch.Tensor) -> None:
    write_config(saved, num_hidden_layers=3)
    loose = GPTNeoXJapaneseForCausalLM.from_pretrained(saved, strict=False)
    assert len(loose.gpt_neox_japanese.layers) == 3  # the third layer initialised


def test_absurd_sizes_fail_before_anything_is_built(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neoxja.network

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer was built")

    monkeypatch.setattr(neoxja.network.GPTNeoXJapaneseLayer, "__init__", never)
    write_config(saved, num_hidden_layers=10**9)
    with pytest.raises(
        ValueError, match=r"config.json: num_hidden_layers=1000000000 is beyond the limit of 1024"
    ):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    write_config(saved, num_hidden_layers=2, hidden_size=2**62, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"hidden_size=4611686018427387904 is beyond the limit"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)
    write_config(saved, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"num_hidden_layers=1000000000 is beyond the limit"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved, num_hidden_layers=10**9)  # an override too
    write_config(saved, num_hidden_layers=3)  # sane, but not these weights: refused before building
    with pytest.raises(CheckpointError, match="num_hidden_layers is 3"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_bin_index_layers_are_checked_before_any_shard_is_read(saved: Path) -> None:
    state = state_of(saved)
    (saved / "model.safetensors").unlink()
    write_bin_shards(state, saved)
    for shard in saved.glob("pytorch_model-*.bin"):
        shard.write_bytes(b"not read")
    write_config(saved, num_hidden_layers=4)
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin.index.json: the checkpoint has layers 0 to 1"
    ):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "index, message",
    [
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] is 3, not a shard file name"),
        ('{"weight_map": []}', r"'weight_map' must be an object .*a JSON list"),
        ('{"metadata": {}}', r"'weight_map' must be an object .*no such key"),
        ('{"weight_map": ' + "[" * 100 + "]" * 100 + "}", "nested more than 64 levels"),
    ],
)
def test_shard_index_errors_name_the_key(saved: Path, index: str, message: str) -> None:
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json.*{message}"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(saved)


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """A pickle can run code when it loads: each torch.load call of neoxja passes weights_only=True."""
    import ast

    import neoxja

    calls = 0
    for path in Path(neoxja.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load":
                if isinstance(func.value, ast.Name) and func.value.id == "torch":
                    calls += 1
                    flags = {k.arg: k.value for k in node.keywords}
                    safe = (
                        isinstance(flags.get("weights_only"), ast.Constant)
                        and flags["weights_only"].value is True
                    )
                    assert safe, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 3  # checkpoint.py (twice) and the trainer state: the scan does see them
