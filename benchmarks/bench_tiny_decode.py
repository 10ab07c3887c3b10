"""Where a tiny model's decoding time goes: neoxja and transformers against bounds of a PyTorch step.

Same setup as the tiny row of bench_generate.py (its config, prompt and length; float32, 2 threads,
greedy, batch 1). Besides both libraries' generate(), it
times, per token and on the same weights:

- the output projection (packed, as neoxja runs it) plus the greedy pick alone;
- a minimal decode step written out by hand: plain tensor ops on the weights, a static cache and
  rotary tables, no modules, no checks, no generation loop (``--compile`` also runs it through
  torch.compile with inductor's C++ wrapper and frozen weights; compiling takes a while).

These bound what an implementation of the step in PyTorch ops can reach on this machine; neoxja's
generate() runs its steps in C (neoxja.cpu_decode) and so is not bound by them.

    python benchmarks/bench_tiny_decode.py [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from bench_generate import CONFIGS, NEW_TOKENS, PROMPT, VOCAB, best_seconds

import neoxja
from neoxja.sample_utils import greedy

CONFIG = dict(vocab_size=VOCAB, **CONFIGS["tiny"])


def best_per_token(run: Callable[[], object], tokens: int, repeats: int) -> float:
    """Fastest of ``repeats`` runs (after one warm-up), in microseconds per token."""
    return best_seconds(run, repeats) / tokens * 1e6


def minimal_step(model: neoxja.GPTNeoXJapaneseForCausalLM, length: int) -> Callable:
    """A decode step for ``model``'s weights with nothing but the arithmetic (rotary over the whole
    head, which the default config uses). Returns ``step(token [1, 1], position [1], keys, values)``."""
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    size, half = hidden // heads, hidden // heads // 2
    base = model.gpt_neox_japanese
    layers = [
        (
            layer.input_layernorm, layer.attention.query_key_value._parameters["weight"],
            layer.attention.dense._parameters["weight"], layer.attention.dense_bias,
            layer.post_attention_layernorm, layer.mlp.dense_h_to_4h._parameters["weight"],
            layer.mlp.dense_4h_to_h._parameters["weight"],
        )
        for layer in base.layers
    ]
    head, embedding, final_norm = model.embed_out, base.embed_in.weight, base.final_layer_norm
    positions = torch.arange(length)
    inv_freq = base.rotary_emb.inv_freq

    def step(token: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        x = F.embedding(token, embedding)
        angles = position.float()[:, None] * inv_freq
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((-angles, angles), -1).sin()
        mask = (positions <= position)[None, None, None, :]
        for i, (norm1, qkv_weight, dense_weight, dense_bias, norm2, up, down) in enumerate(layers):
            h = F.layer_norm(x, (hidden,), norm1.weight, norm1.bias, norm1.eps)
            q, k, v = F.linear(h, qkv_weight).view(1, 1, heads, 3, size).transpose(1, 2).unbind(3)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            keys[i].index_copy_(2, position, k)
            values[i].index_copy_(2, position, v)
            out = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask)
            out = F.linear(out.transpose(1, 2).reshape(1, 1, hidden), dense_weight)
            x = (out + dense_bias if dense_bias is not None else out) + x
            h = F.layer_norm(x, (hidden,), norm2.weight, norm2.bias, norm2.eps)
            x = F.linear(F.gelu(F.linear(h, up)), down) + x
        x = F.layer_norm(x, (hidden,), final_norm.weight, final_norm.bias, final_norm.eps)
        return greedy(head(x)[:, -1])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the minimal step compiled")
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    reference = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(0, 31000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    rows = []
    with torch.inference_mode():
        rows.append(("transformers generate()", best_per_token(
            lambda: reference.generate(ids, **settings), NEW_TOKENS, args.repeats)))
        rows.append(("neoxja generate()", best_per_token(
            lambda: ours.generate(ids, **settings), NEW_TOKENS, args.repeats)))  # steps in C

        last_hidden = torch.randn(1, 1, CONFIG["hidden_size"])
        rows.append(("output projection + greedy pick alone", best_per_token(
            lambda: [greedy(ours.embed_out(last_hidden)[:, -1]) for _ in range(NEW_TOKENS)],
            NEW_TOKENS, args.repeats)))

        length = PROMPT + NEW_TOKENS
        heads = CONFIG["num_attention_heads"]
        cache_shape = (CONFIG["num_hidden_layers"], 1, heads, length, CONFIG["hidden_size"] // heads)
        step = minimal_step(ours, length)
        variants = [("minimal eager step", step)]
        if args.compile:
            import torch._inductor.config as inductor

            inductor.cpp_wrapper, inductor.freezing = True, True
            variants.append(("minimal step, torch.compile (inductor, C++ wrapper)", torch.compile(step)))
        expected = ours.generate(ids, **settings)[0, PROMPT:].tolist()
        for label, fn in variants:
            # The prompt goes through the step once, untimed; each timed run decodes from that cache.
            keys, values = torch.zeros(cache_shape), torch.zeros(cache_shape)
            start = time.perf_counter()
            for position in range(PROMPT):  # compiles, for the compiled variant
                first = fn(ids[:, position : position + 1], torch.tensor([position]), keys, values)
            warm_up = time.perf_counter() - start
            generated: list[int] = []

            def decode(fn: Callable = fn, first: torch.Tensor = first, keys: torch.Tensor = keys,
                       values: torch.Tensor = values, generated: list[int] = generated) -> None:
                token, keys, values = first.view(1, 1), keys.clone(), values.clone()
                generated[:] = [int(token)]
                for position in range(PROMPT, length - 1):
                    token = fn(token, torch.tensor([position]), keys, values).view(1, 1)
                    generated.append(int(token))

            micros = best_per_token(decode, NEW_TOKENS, args.repeats)
            same = "same tokens" if generated == expected else "DIFFERENT tokens"
            rows.append((f"{label} (first call {warm_up:.1f} s; {same})", micros))

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 2 threads, float32, tiny "
          f"config, prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy, batch 1\n")
    reference_time = rows[0][1]
    print("| what | us per token | tok/s | transformers / this |")
    print("|---|---:|---:|---:|")
    for label, micros in rows:
        print(f"| {label} | {micros:.0f} | {1e6 / micros:.0f} | {reference_time / micros:.2f}x |")
    print(f"\n5x transformers would need {reference_time / 5:.0f} us per token.")


if __name__ == "__main__":
    main()
