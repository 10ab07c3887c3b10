"""Every example of the seed document, with ``transformers`` replaced by ``neoxja``.

Each runs twice: against a local tiny model directory standing in for the Hub id, and with the
seed's literal "abeja/gpt-neox-japanese-2.7b" resolved from an offline Hub cache laid out by the
test (HF_HUB_OFFLINE=1). The model is tiny and random, so outputs are checked for shape and against
transformers on the same files, except the tokenizer example, whose ids and text the seed states.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_checkpoint
from test_visualizer import parse_grids

import neoxja
from neoxja.cli import main

HUB_ID = "abeja/gpt-neox-japanese-2.7b"
COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
PROMPT = "人とAIが協調するためには、"
EMOJI_TEXT = "日本語のGPT-neoxがHugging Faceで使えます😀"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir, seed=4)


@pytest.fixture(params=["local-directory", "offline-hub-cache"])
def model_id(
    request: pytest.FixtureRequest, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """What the examples pass as the model name: the tiny directory, or the Hub id served from a cache."""
    if request.param == "local-directory":
        return str(tiny_dir)
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return HUB_ID


def test_pipeline_example(model_id: str) -> None:
    # The seed runs on GPU 0 in float16; on a CPU-only machine the same call goes to the CPU.
    device = 0 if torch.cuda.is_available() else "cpu"
    pipeline = neoxja.pipeline(task="text-generation", model=model_id, dtype=torch.float16, device=device)
    # float16 matmuls are ~20x slower than float32 on CPUs, so there the call is shortened from the
    # pipeline's default 256 new tokens (test_pipeline checks that default without decoding it).
    result = pipeline(PROMPT) if torch.cuda.is_available() else pipeline(PROMPT, max_new_tokens=8)
    assert pipeline.model.dtype == torch.float16
    assert len(result) == 1 and result[0]["generated_text"].startswith(PROMPT)


@pytest.mark.filterwarnings("ignore:.*max_length:UserWarning")  # the seed's generate() sets no length
@pytest.mark.filterwarnings("ignore:.*max_new_tokens:UserWarning")
def test_quantized_automodel_example(model_id: str) -> None:
    from neoxja import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="float16",
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_id, quantization_config=quantization_config, device_map="auto"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    input_ids = tokenizer.encode(PROMPT, return_tensors="pt").to(model.device)
    output = model.generate(input_ids)
    text = tokenizer.decode(output[0], skip_special_tokens=True)

    layers = model.gpt_neox_japanese.layers
    assert type(layers[0].mlp.dense_h_to_4h).__name__ == "LinearNF4"
    assert layers[0].mlp.dense_h_to_4h.nested_absmax is not None  # double quantization
    assert type(model.embed_out) is torch.nn.Linear  # the head stays in its dtype, as in transformers
    # The same generation from a dense model holding the dequantized weights (computed in float32,
    # as neoxja's CPU kernels compute): the quantized layers multiply by exactly those weights.
    dense = neoxja.linear.restore_dense(
        AutoModelForCausalLM.from_pretrained(model_id, quantization_config=quantization_config)
    )
    assert torch.equal(output, dense.generate(input_ids))
    assert text.startswith(PROMPT)


def test_cli_example(model_id: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", model_id, "--max-new-tokens", "8", "--temperature", "0", PROMPT]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_attention_mask_visualizer_example(model_id: str, capsys: pytest.CaptureFixture) -> None:
    from neoxja.utils.attention_visualizer import AttentionMaskVisualizer

    visualizer = AttentionMaskVisualizer(model_id)
    visualizer("<img>What is shown in this image?")
    [(labels, cells)] = parse_grids(capsys.readouterr().out)
    assert labels == visualizer.tokenizer.tokenize("<img>What is shown in this image?")
    n = len(labels)
    assert cells == [[j <= i for j in range(n)] for i in range(n)]


def test_config_example() -> None:
    from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseModel

    # Initializing a GPTNeoXJapanese gpt-neox-japanese-2.7b style configuration
    configuration = GPTNeoXJapaneseConfig()
    # Initializing a model (with random weights) from the gpt-neox-japanese-2.7b style configuration.
    # On the meta device, so the test does not allocate 2.7B parameters; the classes are the same.
    with torch.device("meta"):
        model = GPTNeoXJapaneseModel(configuration)
    # Accessing the model configuration
    configuration = model.config
    assert configuration.hidden_size == 2560 and configuration.num_hidden_layers == 32


def test_tokenizer_example(model_id: str) -> None:
    from neoxja import GPTNeoXJapaneseTokenizer

    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(model_id)
    text = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
    ids = tokenizer(text)["input_ids"]
    assert ids == [
        30014,
        26883,
        26638,
        27228,
        25,
        26650,
        31732,
        31679,
        27809,
        26638,
        17749,
        31592,
        17749,
        31593,
        321,
        1281,
    ]
    assert tokenizer.decode(ids) == "吾輩は猫である🐯。実は慶応(慶応)大学出身"


def test_model_example(model_id: str, tiny_dir: Path) -> None:
    import transformers

    from neoxja import AutoTokenizer, GPTNeoXJapaneseModel

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = GPTNeoXJapaneseModel.from_pretrained(model_id)
    inputs = tokenizer(EMOJI_TEXT, return_tensors="pt")
    outputs = model(**inputs)
    last_hidden_states = outputs.last_hidden_state

    reference = transformers.GPTNeoXJapaneseModel.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = reference(
            **transformers.AutoTokenizer.from_pretrained(tiny_dir)(EMOJI_TEXT, return_tensors="pt")
        )
    torch.testing.assert_close(last_hidden_states, expected.last_hidden_state, rtol=1e-4, atol=1e-5)


def test_causal_lm_example(model_id: str, tiny_dir: Path) -> None:
    import transformers

    from neoxja import AutoTokenizer, GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    config = GPTNeoXJapaneseConfig.from_pretrained(model_id)
    config.is_decoder = True
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_id, config=config)
    inputs = tokenizer(EMOJI_TEXT, return_tensors="pt")
    outputs = model(**inputs)
    prediction_logits = outputs.logits

    reference = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = reference(
            **transformers.AutoTokenizer.from_pretrained(tiny_dir)(EMOJI_TEXT, return_tensors="pt")
        )
    torch.testing.assert_close(prediction_logits, expected.logits, rtol=1e-4, atol=1e-5)
