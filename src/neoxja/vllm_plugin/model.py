"""GPT-NeoX-Japanese as a vLLM model, built from vLLM's own layers.

The same computation as :mod:`neoxja.network` (and transformers' ``gpt_neox_japanese``):

    x = embed_in(ids)
    for each layer:                    # sequential pre-norm residuals (not GPT-NeoX's parallel one)
        x = x + dense(attention(rope(query_key_value(input_layernorm(x)))))  [+ dense_bias, last layer]
        x = x + dense_4h_to_h(act(dense_h_to_4h(post_attention_layernorm(x))))
    logits = embed_out(final_layer_norm(x))                # embed_out tied to embed_in by default

Linear layers have no bias except the last layer's attention output (``dense_bias``). The layers
are vLLM's tensor-parallel ones (``QKVParallelLinear`` split by head, ``RowParallelLinear``,
``ColumnParallelLinear``, ``VocabParallelEmbedding``/``ParallelLMHead``), its rotary embedding
(``get_rope``, neox style, ``rotary_pct`` of each head) and its paged ``Attention``, so tensor
parallelism, torch.compile/CUDA graphs and vLLM's quantization methods apply as for its built-in
models; pipeline parallelism splits the layers into stages. The checkpoint is read by
:meth:`GPTNeoXJapaneseForCausalLM.load_weights` (rules in :mod:`neoxja.vllm_plugin.weights`).
This module imports vLLM: only vLLM's model loader imports it.
"""

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from neoxja.configuration import get_activation
from neoxja.vllm_plugin.weights import (
    HEAD,
    CheckpointKeyError,
    check_tensor,
    expected_shapes,
    is_buffer,
    missing_keys,
    parameter_name,
    split_qkv,
)


def rope_parameters(config: Any) -> dict[str, Any]:
    """vLLM's ``get_rope`` settings of ``config``: ``rope_parameters`` (transformers 5), else the old
    ``rotary_pct``/``rotary_emb_base``/``rope_scaling`` fields, with the rotary fraction of each head.

    transformers' "dynamic" NTK scaling changes the frequencies only once a sequence outgrows the
    trained length; vLLM's scales them at every length, so the two would disagree: refused."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rotary_emb_base", 10000))
    rope.setdefault("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    rope_type = rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")  # 4.x: "type"
    if rope_type == "dynamic":
        raise ValueError(
            "config.json: rope_type 'dynamic' is not supported by neoxja's vLLM model (vLLM's dynamic NTK "
            "scaling changes the frequencies at every length, transformers' only beyond the trained one)"
        )
    return rope


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """vLLM's activation module of that name (its fused kernels), else neoxja's (same as transformers')."""
    try:
        return get_act_fn(name)
    except ValueError:
        return get_activation(name)


class GPTNeoXJapaneseAttention(nn.Module):
    """Self-attention: fused q/k/v projection, RoPE on the first ``rotary_ndims`` of each head, paged
    attention, output projection (with ``dense_bias`` on the last layer)."""

    def __init__(self, vllm_config: VllmConfig, last: bool, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        heads, hidden = config.num_attention_heads, config.hidden_size
        tp_size = get_tensor_model_parallel_world_size()
        if heads % tp_size:
            raise ValueError(
                f"num_attention_heads={heads} cannot be split over tensor_parallel_size={tp_size}"
            )
        self.head_size = hidden // heads
        self.local_size = heads // tp_size * self.head_size
        self.query_key_value = QKVParallelLinear(
            hidden,
            self.head_size,
            heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.query_key_value",
            return_bias=False,
        )
        self.dense = RowParallelLinear(
            hidden, hidden, bias=last, quant_config=quant_config, prefix=f"{prefix}.dense", return_bias=False
        )
        self.rotary_emb = get_rope(
            self.head_size,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=rope_parameters(config),
        )
        self.attn = Attention(
            heads // tp_size,
            self.head_size,
            self.head_size**-0.5,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(x).split(self.local_size, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v))


class GPTNeoXJapaneseMLP(nn.Module):
    """hidden -> hidden * intermediate_multiple_size -> hidden, no biases."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        intermediate = int(config.hidden_size * config.intermediate_multiple_size)
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size,
            intermediate,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.dense_h_to_4h",
            return_bias=False,
        )
        self.dense_4h_to_h = RowParallelLinear(
            intermediate,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.dense_4h_to_h",
            return_bias=False,
        )
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXJapaneseLayer(nn.Module):
    """One block: attention then MLP, each on its own layer norm and added to the residual."""

    def __init__(self, vllm_config: VllmConfig, index: int, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        last = index == config.num_hidden_layers - 1
        self.attention = GPTNeoXJapaneseAttention(vllm_config, last, prefix=f"{prefix}.attention")
        self.mlp = GPTNeoXJapaneseMLP(vllm_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class GPTNeoXJapaneseModel(nn.Module):
    """Embeddings, layers and the final layer norm: hidden states for vLLM's flattened token batch.

    Under pipeline parallelism each stage holds its own run of layers (the others are placeholders);
    the first also the embedding, the last the final norm (and the embedding too when the head is
    tied to it), and stages hand each other the hidden states."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        stage = get_pp_group()
        if stage.is_first_rank or (config.tie_word_embeddings and stage.is_last_rank):
            self.embed_in = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.embed_in",
            )
        else:
            self.embed_in = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: GPTNeoXJapaneseLayer(vllm_config, extract_layer_index(prefix), prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        if stage.is_last_rank:
            self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.final_layer_norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        stage = get_pp_group()
        if not stage.is_first_rank:
            x = intermediate_tensors["hidden_states"]
        else:
            x = self.embed_in(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            x = layer(positions, x)
        if not stage.is_last_rank:
            return IntermediateTensors({"hidden_states": x})
        return self.final_layer_norm(x)


class GPTNeoXJapaneseForCausalLM(nn.Module, SupportsPP):
    """vLLM's text-generation model for checkpoints of architecture ``GPTNeoXJapaneseForCausalLM``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.gpt_neox_japanese = GPTNeoXJapaneseModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "gpt_neox_japanese")
        )
        if get_pp_group().is_last_rank:
            self.embed_out = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "embed_out"),
            )
            if config.tie_word_embeddings:
                self.embed_out = self.embed_out.tie_weights(self.gpt_neox_japanese.embed_in)
        else:
            self.embed_out = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.gpt_neox_japanese.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox_japanese.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.gpt_neox_japanese(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.embed_out, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Fill every parameter from transformers' checkpoint tensors ``(key, tensor)``; returns the
        names of the parameters loaded. A key with no place, a wrong shape or a parameter left
        unfilled is a :class:`CheckpointKeyError` naming the checkpoint key."""
        config = self.config
        expected = expected_shapes(config)
        tied = bool(config.tie_word_embeddings)
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for key, tensor in weights:
            if is_buffer(key):
                continue
            check_tensor(key, tensor.shape, expected)
            if key == HEAD and tied:  # the head is embed_in's weight; transformers ignores this copy too
                continue
            name = parameter_name(key)
            if is_pp_missing_parameter(name, self):  # another pipeline stage's
                continue
            param = params[name]
            if key.endswith(".query_key_value.weight"):
                for shard, part in zip("qkv", split_qkv(tensor, config.num_attention_heads), strict=True):
                    param.weight_loader(param, part, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        required = {parameter_name(key) for key in expected if not (key == HEAD and tied)}
        required = {name for name in required if not is_pp_missing_parameter(name, self)}
        if required - loaded:
            keys = missing_keys(required - loaded)
            raise CheckpointKeyError(
                f"the checkpoint lacks {len(keys)} tensor(s) the model needs: {', '.join(keys[:8])}"
                + (" ..." if len(keys) > 8 else "")
            )
        return loaded
