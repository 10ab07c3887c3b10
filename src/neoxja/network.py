"""The GPT-NeoX-Japanese network in plain PyTorch (no generation: see :mod:`neoxja.modeling`).

Same computation and the same state-dict keys as transformers' ``gpt_neox_japanese`` model:

    x = embed_in(ids)
    for each layer:                                   # sequential residual, not GPT-NeoX's parallel one
        x = x + dropout(attention(input_layernorm(x)) [+ dense_bias on the last layer])
        x = x + dropout(mlp(post_attention_layernorm(x)))
    logits = embed_out(final_layer_norm(x))           # embed_out tied to embed_in by default

Linear layers have no bias; the only bias is ``dense_bias`` of the last layer's attention. RoPE
rotates the first ``rotary_ndims`` dimensions of each head. Attention runs through
``F.scaled_dot_product_attention``, or in CPU training with attention dropout (which SDPA's CPU
kernels cannot do) through :mod:`neoxja.dropout_attention`; the explicit (eager) path is used only
when the attention weights are asked for (``output_attentions``) or a ``head_mask`` must scale them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from neoxja.cache import KVCache
from neoxja.configuration import GPTNeoXJapaneseConfig, get_activation
from neoxja.dropout_attention import dropout_attention
from neoxja.loss import IGNORE_INDEX, chunked_loss_sum, logits_loss_sum, next_token_targets
from neoxja.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from neoxja.rope import RotaryEmbedding, apply_rotary

# ----- outputs --------------------------------------------------------------------------------------


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    key_length: int,
    batch_size: int,
) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask ``[batch or 1, 1, query, key]`` (True = may attend) and whether SDPA's
    ``is_causal`` can replace it.

    ``query_positions`` are the absolute positions of the new tokens in the cache (``cache_position``),
    ``attention_mask`` the 2-D padding mask over all ``key_length`` positions (1 = real token).
    Without padding the cheap forms are used: nothing for one new token, ``is_causal`` for a prompt
    with an empty cache. A query always sees its own key, so a padding row never has every key
    masked (which would give NaN that leaks into the real rows through the values).
    """
    num_queries = query_positions.shape[-1]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, key_length):
            raise ValueError(
                f"attention_mask must have shape [batch, past + new] = [{batch_size}, {key_length}], "
                f"got {list(attention_mask.shape)}"
            )
        if num_queries > 1 and bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None:
        if num_queries == 1:  # the newest token sees every cached position
            return None, False
        if num_queries == key_length:
            return None, True
    keys = torch.arange(key_length, device=query_positions.device)
    queries = query_positions.view(-1, 1)
    mask = keys <= queries
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (keys == queries)
    else:
        mask = mask[None, None]
    return mask, False


# ----- network --------------------------------------------------------------------------------------


class GPTNeoXJapaneseAttention(nn.Module):
    """Multi-head self-attention with a fused ``query_key_value`` projection laid out per head as [q|k|v]."""

    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        last = layer_idx == config.num_hidden_layers - 1
        self.dense_bias = nn.Parameter(torch.zeros(config.hidden_size)) if last else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, hidden = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.num_heads, 3, self.head_size).transpose(1, 2)
        q, k = apply_rotary(qkv.narrow(3, 0, 2), rope).unbind(3)  # [batch, heads, length, head_size]
        v = qkv.select(3, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)

        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or head_mask is not None:
            out, weights = self._eager(q, k, v, mask, is_causal, dropout, head_mask)
        elif dropout > 0 and q.device.type == "cpu":  # SDPA's CPU kernels cannot drop out
            out = dropout_attention(q, k, v, mask, is_causal, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
        out = self.dense(out.transpose(1, 2).reshape(batch, length, hidden))
        if self.dense_bias is not None:
            out = out + self.dense_bias
        return out, weights

    def _eager(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        dropout: float,
        head_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with explicit weights; scores and softmax in float32, so fp16/bf16 cannot overflow."""
        scale = 1.0 / math.sqrt(self.head_size)
        scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
        if is_causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        if dropout > 0:  # as F.dropout, but a uniform draw is ~2x cheaper on CPU than bernoulli_
            weights = weights * ((torch.rand_like(weights) >= dropout) / (1.0 - dropout))
        weights = weights.to(v.dtype)
        if head_mask is not None:
            weights = weights * head_mask
        return torch.matmul(weights, v), weights


class GPTNeoXJapaneseMLP(nn.Module):
    """hidden -> hidden * intermediate_multiple_size -> hidden, activation ``hidden_act``, no biases."""

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__()
        intermediate = int(config.hidden_size * config.intermediate_multiple_size)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate, config.hidden_size, bias=False)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXJapaneseLayer(nn.Module):
    """One transformer block with sequential (pre-norm) residuals."""

    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXJapaneseAttention(config, layer_idx)
        self.mlp = GPTNeoXJapaneseMLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.attention(
            self.input_layernorm(x), rope, mask, is_causal, cache, head_mask, output_attentions
        )
        dropout = self.hidden_dropout if self.training else 0.0
        if dropout:
            attn = F.dropout(attn, dropout, True)
        # The branch outputs are fresh tensors that autograd does not keep, so adding in place is safe.
        x = attn.add_(x)
        out = self.mlp(self.post_attention_layernorm(x))
        if dropout:
            out = F.dropout(out, dropout, True)
        return out.add_(x), weights


class GPTNeoXJapanesePreTrainedModel(nn.Module):
    """Shared plumbing: the config, weight initialisation, ``from_pretrained``/``save_pretrained``."""

    config_class = GPTNeoXJapaneseConfig
    base_model_prefix = "gpt_neox_japanese"

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTNeoXJapaneseConfig):
            raise TypeError(f"config must be a GPTNeoXJapaneseConfig, got {type(config).__name__}")
        self.config = config

    def post_init(self) -> None:
        """Initialise every weight (skipped on the meta device) and tie the embeddings if configured."""
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' scheme: normal(0, initializer_range) weights, zero biases, unit layer norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GPTNeoXJapaneseAttention) and module.dense_bias is not None:
            nn.init.zeros_(module.dense_bias)

    def _apply(self, fn: Any, recurse: bool = True) -> GPTNeoXJapanesePreTrainedModel:
        # .to()/.half()/...: a layer that cannot move (a weight format bound to one device) says so
        # before any other layer has moved, so a refused move leaves the whole model as it was.
        for module in self.modules():
            check = getattr(module, "check_movable", None)
            if check is not None:
                check()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> GPTNeoXJapanesePreTrainedModel:
        # Likewise an inference-only layer refuses training mode before any module has switched.
        for module in self.modules() if mode else ():
            check = getattr(module, "check_trainable", None)
            if check is not None:
                check()
        return super().train(mode)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations during backward instead of keeping them (training
        forwards without a cache): less memory for one more forward. transformers' method name;
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``."""
        self.base_model.gradient_checkpointing = True
        self.base_model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self) -> None:
        """Keep activations again (the default)."""
        self.base_model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether :meth:`gradient_checkpointing_enable` is in effect."""
        return self.base_model.gradient_checkpointing

    def tie_weights(self) -> None:
        """Make the output projection share the input embedding when ``config.tie_word_embeddings``."""
        output = self.get_output_embeddings()
        if output is not None and getattr(self.config, "tie_word_embeddings", True):
            output.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.base_model_prefix).embed_in

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        getattr(self, self.base_model_prefix).embed_in = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    @property
    def base_model(self) -> GPTNeoXJapaneseModel:
        """The bare transformer (``self`` for :class:`GPTNeoXJapaneseModel`)."""
        return getattr(self, self.base_model_prefix, self)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the floating-point parameters."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of (distinct) parameters; tied weights count once. ``exclude_embeddings`` leaves out
        the input embedding (as transformers does, an untied output head still counts)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: GPTNeoXJapaneseConfig | str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = "auto",
        device: torch.device | str | int | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> GPTNeoXJapanesePreTrainedModel:
        """Load a model directory or Hub id written by transformers or neoxja (:mod:`neoxja.checkpoint`)."""
        from neoxja.checkpoint import load_pretrained

        return load_pretrained(
            cls,
            pretrained_model_name_or_path,
            config=config,
            dtype=dtype,
            device=device,
            strict=strict,
            **kwargs,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        max_shard_size: int | str = "50GB",
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write ``config.json`` and the weights (safetensors by default) that transformers can load;
        ``state_dict`` replaces the model's own (e.g. weights gathered from FSDP shards)."""
        from neoxja.saving import save_pretrained

        save_pretrained(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            max_shard_size=max_shard_size,
            state_dict=state_dict,
        )


class GPTNeoXJapaneseModel(GPTNeoXJapanesePreTrainedModel):
    """The bare transformer: embeddings, layers and the final layer norm; returns hidden states."""

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__(config)
        # An uninitialised table (post_init fills it): nn.Embedding's own N(0, 1) init would be wasted
        # work, and on the meta device it costs a slow first-time import inside torch.
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_in = nn.Embedding.from_pretrained(table, freeze=False)
        self.layers = nn.ModuleList(GPTNeoXJapaneseLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # The rotary tables are computed, never loaded, so they are built for real even when the
        # weights are created on the meta device (as from_pretrained does).
        device = torch.get_default_device()
        with torch.device("cpu" if device.type == "meta" else device):
            self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_in

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_in = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states for ``input_ids`` (or ``inputs_embeds``) ``[batch, new]``.

        ``attention_mask`` is the 2-D padding mask over past + new positions. ``position_ids``
        default to the cache positions (``cache_position``, else ``past .. past + new - 1``);
        pass them explicitly for left-padded batches. ``head_mask`` (``[heads]`` or
        ``[layers, heads]``, 1 keeps a head) scales the attention weights. With ``use_cache`` a
        :class:`KVCache` is created when none is given and returned in ``past_key_values``.
        """
        config = self.config
        output_attentions = _default(output_attentions, config, "output_attentions", False)
        output_hidden_states = _default(output_hidden_states, config, "output_hidden_states", False)
        return_dict = _default(return_dict, config, "return_dict", True)
        # Training forwards do not fill a cache unless asked to: it would only cost copies.
        use_cache = bool(use_cache) if self.training else _default(use_cache, config, "use_cache", True)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None and input_ids.device.type == "cpu":
            # On the CPU only: on a device the check would cost a sync per forward (once per decoding
            # step), and the device's own assertion stops the embedding kernel anyway.
            check_token_ids(input_ids, config.vocab_size)
        x = self.embed_in(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3:
            if inputs_embeds is None:
                raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
            raise ValueError(f"inputs_embeds must be [batch, seq, hidden], got shape {list(x.shape)}")
        batch, length, _ = x.shape

        cache = past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be a neoxja.KVCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = KVCache(config, batch, None, dtype=x.dtype, device=x.device)
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + length, device=x.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        mask, is_causal = build_attention_mask(attention_mask, cache_position, past + length, batch)
        rope = self.rotary_emb.tables(x, position_ids)
        head_masks = self._head_masks(head_mask, x.dtype)

        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer, layer_head_mask in zip(self.layers, head_masks, strict=True):
            if all_hidden is not None:
                all_hidden.append(x)
            args = (x, rope, mask, is_causal, cache, layer_head_mask, output_attentions)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                # Keep only the layer's input; recompute its inside during backward (the RNG state is
                # replayed, so dropout draws the same masks and the gradients are the same).
                x, weights = torch.utils.checkpoint.checkpoint(layer, *args, **self.checkpoint_kwargs)
            else:
                x, weights = layer(*args)
            if all_attentions is not None:
                all_attentions.append(weights)
        x = self.final_layer_norm(x)
        if all_hidden is not None:
            all_hidden.append(x)
        if cache is not None:
            cache.advance(length)

        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
        )
        return out if return_dict else out.to_tuple()

    def _head_masks(self, head_mask: torch.Tensor | None, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """One ``[1, heads, 1, 1]`` multiplier (or None) per layer from a ``[heads]``/``[layers, heads]``
        mask."""
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask is None:
            return [None] * layers
        if head_mask.shape == (heads,):
            head_mask = head_mask.expand(layers, heads)
        if head_mask.shape != (layers, heads):
            raise ValueError(
                f"head_mask must have shape [heads] = [{heads}] or [layers, heads] = [{layers}, {heads}], "
                f"got {list(head_mask.shape)}"
            )
        return list(head_mask.to(dtype).view(layers, 1, heads, 1, 1))


class GPTNeoXJapaneseLMHeadModel(GPTNeoXJapanesePreTrainedModel):
    """The transformer with its language-modelling head ``embed_out`` (tied to ``embed_in`` by default).

    :class:`neoxja.modeling.GPTNeoXJapaneseForCausalLM` is this network plus ``generate()``.
    """

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__(config)
        self.gpt_neox_japanese = GPTNeoXJapaneseModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not self.embed_out.weight.is_meta:  # the transformer initialised itself already
            self._init_weights(self.embed_out)
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.embed_out = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits ``[batch, kept, vocab]``; arguments as :meth:`GPTNeoXJapaneseModel.forward`.

        ``labels`` ``[batch, seq]`` (-100 = ignore) give the mean cross-entropy of predicting token
        ``t + 1`` from position ``t`` (the sum divided by ``num_items_in_batch`` when given, as in
        transformers: the target count of a whole accumulated step, or 1 for the sum).
        ``logits_to_keep`` = n > 0 computes logits for the last n positions only (a 1-D tensor
        selects positions); 0 keeps all. ``skip_logits`` (with ``labels``) returns the loss alone
        (``logits`` None), computed a chunk of positions at a time (:mod:`neoxja.loss`) and under
        gradient checkpointing recomputed in backward: a training step then never holds the
        ``[batch, seq, vocab]`` logits.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True needs labels (the loss is all it returns)")
        return_dict = _default(return_dict, self.config, "return_dict", True)
        out = self.gpt_neox_japanese(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        loss = logits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels must have shape {list(hidden.shape[:2])}, got {list(labels.shape)}")
            targets = next_token_targets(labels).to(hidden.device)
            count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
        if skip_logits:
            recompute = self.training and self.is_gradient_checkpointing
            loss = chunked_loss_sum(hidden, self.embed_out, targets, recompute) / count
        else:
            logits = self.embed_out(hidden)
            if labels is not None:
                loss = logits_loss_sum(logits, targets) / count

        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError naming the first id outside [0, vocab_size), its row and position, instead of the
    embedding's bare IndexError (``generate()`` calls it once per call on any device)."""
    if input_ids.numel() == 0 or (int(input_ids.min()) >= 0 and int(input_ids.max()) < vocab_size):
        return
    bad = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
    raise ValueError(
        f"{name} holds token id {int(input_ids[tuple(bad)])} at position ({', '.join(map(str, bad))}), "
        f"outside the vocabulary [0, {vocab_size})"
    )


def _default(value: bool | None, config: GPTNeoXJapaneseConfig, name: str, fallback: bool) -> bool:
    """An explicit argument wins over the config's setting of the same name."""
    return value if value is not None else getattr(config, name, fallback)
