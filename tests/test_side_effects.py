"""Nothing changes a model as a side effect of using it, and a generation never sees another call's work.

A user's model is loaded, run through a no-grad forward, generate(), pipeline() and the visualizer;
afterwards every parameter is the same object with the same bits and every module of the same class.
Forwards between streamed pieces, and in other threads while several threads generate, leave each
generation's tokens as they are without them.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch
from conftest import TINY, make_reference

import neoxja
from neoxja.utils.attention_visualizer import AttentionMaskVisualizer

# Large enough that the old implicit oneDNN packing would have rewritten its weights.
WIDE = {**TINY, "hidden_size": 256, "num_attention_heads": 4}


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    classes = {name: type(m) for name, m in model.named_modules()}
    return params, classes


def _unchanged(model: torch.nn.Module, snapshot: tuple[dict, dict]) -> None:
    params, classes = snapshot
    assert {name: type(m) for name, m in model.named_modules()} == classes
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (param, values) in params.items():
        assert now[name] is param, name
        assert torch.equal(param.detach(), values), name


def _wide_checkpoint(directory: Path, assets_dir: Path) -> Path:
    import transformers

    make_reference(WIDE, seed=3).save_pretrained(directory)
    transformers.GPTNeoXJapaneseTokenizer(
        str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json")
    ).save_pretrained(directory)
    return directory


def test_using_a_model_leaves_it_as_loaded(tmp_path: Path, assets_dir: Path) -> None:
    directory = _wide_checkpoint(tmp_path, assets_dir)
    model = neoxja.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = neoxja.AutoTokenizer.from_pretrained(directory)
    snapshot = _snapshot(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=True, seed=0)
    neoxja.pipeline("text-generation", model=model, tokenizer=tokenizer)("吾輩は", max_new_tokens=3)
    AttentionMaskVisualizer(directory)("吾輩は猫である")
    _unchanged(model, snapshot)
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_forward_between_streamed_pieces_keeps_the_tokens(tmp_path: Path, assets_dir: Path) -> None:
    directory = _wide_checkpoint(tmp_path, assets_dir)
    tokenizer = neoxja.AutoTokenizer.from_pretrained(directory)
    # deepcopy: weights in owned memory, the case in which a freed weight could be read.
    model = copy.deepcopy(neoxja.AutoModelForCausalLM.from_pretrained(directory)).eval()
    kwargs = dict(max_new_tokens=30, do_sample=False)
    alone = list(neoxja.stream_generate(model, tokenizer, "吾輩は猫である。", **kwargs))
    pieces = neoxja.stream_generate(model, tokenizer, "吾輩は猫である。", **kwargs)
    interrupted = [next(pieces)]
    for piece in pieces:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        interrupted.append(piece)
    assert interrupted == alone


def test_forwards_in_other_threads_while_threads_generate(tmp_path: Path, assets_dir: Path) -> None:
    model = copy.deepcopy(neoxja.AutoModelForCausalLM.from_pretrained(_wide_checkpoint(tmp_path, assets_dir)))
    model.eval()
    prompts = [torch.tensor([[5 + i, 6, 7]]) for i in range(3)]
    alone = [model.generate(p, max_new_tokens=20).tolist() for p in prompts]
    results: list = [None] * len(prompts)
    stop = threading.Event()

    def generate(i: int) -> None:
        results[i] = model.generate(prompts[i], max_new_tokens=20).tolist()

    def forwards() -> None:
        with torch.no_grad():
            while not stop.is_set():
                model(torch.tensor([[1, 2, 3, 4]]))

    noise = threading.Thread(target=forwards)
    noise.start()
    workers = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        stop.set()
        noise.join(timeout=60)
    assert results == alone
