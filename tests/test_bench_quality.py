"""benchmarks/quant_quality.py's measuring parts: the teacher-forced decoding log-probabilities are
those of one forward over the same window (so the KL it reports compares the same positions), and
the KL / top-1 statistics and windows are what they say."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_quality  # noqa: E402


@pytest.fixture(scope="module")
def window(tiny_loaded) -> torch.Tensor:
    _, tokenizer = tiny_loaded
    return torch.tensor(
        tokenizer.encode("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。")
    )


def test_forced_decoding_matches_one_forward(tiny_loaded, window: torch.Tensor) -> None:
    """Every generate() step's recorded log-probabilities are the forward's at the same position (which
    they can only be if the forcing made generate() follow the text)."""
    model, _ = tiny_loaded
    decoded = quant_quality.decode_logprobs(model, [window])
    forward = quant_quality.prompt_logprobs(model, [window])
    assert decoded.shape == forward.shape == (len(window) - 1, model.config.vocab_size)
    torch.testing.assert_close(decoded, forward, atol=1e-4, rtol=1e-4)
    mean, p99, agree = quant_quality.kl_stats(forward, decoded)
    assert abs(mean) < 1e-5 and p99 < 1e-4 and agree == 1.0


def test_forced_decoding_leaves_the_model_as_it_was(tiny_loaded, window: torch.Tensor) -> None:
    model, _ = tiny_loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quant_quality.decode_logprobs(model, [window[:6]])
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kl_stats_of_known_distributions() -> None:
    base = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    test = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1], [0.6, 0.4]]))
    kl = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0]
    kl.append(0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4))
    mean, p99, agree = quant_quality.kl_stats(base, test)
    assert mean == pytest.approx(sum(kl) / 3, rel=1e-5)
    assert p99 == pytest.approx(torch.quantile(torch.tensor(kl), 0.99).item(), rel=1e-5)
    # top-1: row 0 ties at 0.5/0.5 (argmax picks the first) against 0.75 second: differs; row 2 differs
    assert agree == pytest.approx(1 / 3)


def test_windows_cover_the_first_tokens_only_once() -> None:
    chunks = quant_quality.windows(list(range(11)), limit=10, length=4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [c.tolist() for c in quant_quality.windows(list(range(9)), limit=9, length=4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]  # a last window of one token predicts nothing


def test_perplexity_of_the_targets() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    assert quant_quality.perplexity(logp, torch.tensor([0, 1])) == pytest.approx(
        math.exp(-(math.log(0.5) + math.log(0.75)) / 2)
    )
