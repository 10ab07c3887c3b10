"""Decoding steps on the CPU as one C call each (the ``neoxja._decode`` extension).

``generate()`` feeds one token per row per step. Through PyTorch that step is a few dozen ops on
small vectors, each with microseconds of dispatch, which for small models costs more than the
arithmetic, and for quantized models (whose products are fast) a large part of the step. A
:class:`FusedDecoder` runs the whole step (embedding, every layer, the output head and, for greedy
decoding, the argmax) in C, on the model's own weights, dense float32 or quantized
(:mod:`neoxja.quantization.layers`: nf4, fp4, int8, bfloat16, each layer in its own arithmetic,
``fast`` or ``exact``), and the generation's :class:`~neoxja.cache.KVCache`, with its own threads
(as many as ``torch.get_num_threads()``). The prompt (prefill) still goes through the model's
PyTorch forward, which fills the same cache. :meth:`FusedDecoder.verify` feeds several tokens of
each row in one call (assisted decoding's verification of its drafts): each weight is read once for
all of them, and each token's logits are, bit for bit, those of feeding it alone in a step.

``generate()`` uses it by itself (the ``cpu-fused`` backend of :mod:`neoxja.decoding`) when

* the extension was built (``pip install`` compiles it; without a C compiler it is skipped);
* the model is a :class:`~neoxja.modeling.GPTNeoXJapaneseForCausalLM` made of neoxja's own modules
  with their own forwards (not patched or subclassed; quantized layers of
  :data:`quantized_forwards`, without bias), in eval mode, with every parameter and buffer on the
  CPU and contiguous, parameters in float32, no forward hooks, weights not packed for oneDNN
  (:func:`~neoxja.linear.optimize_for_cpu_inference`: a model packed on purpose keeps the PyTorch
  path, whose packed kernels it was packed for);
* its activation is one of :data:`ACTIVATIONS`;
* the environment variable ``NEOXJA_FUSED_DECODE`` is not ``0`` (the switch to compare paths).

The kernels (``src/neoxja/csrc/``, shared with :mod:`neoxja.quantization.kernels`) use AVX-512,
AVX-VNNI, AVX2 or portable C, as the CPU allows (``NEOXJA_DECODE_KERNEL=avx2|avxvnni|scalar`` at
import caps them, for tests); :func:`describe` says which run for a model.

Results agree with the PyTorch step of the same arithmetic: float32 and ``exact`` layers within
float32 rounding (sums run in another order), as two BLAS libraries would; ``fast`` layers within
that arithmetic's own rounding (int8 activations, bfloat16), since the step's float32 inputs to a
product differ from PyTorch's in their last bits. Greedy decoding picks the same tokens unless two
logits tie to within that. Each row's results are the same, bit for bit, whatever the other rows
of a batch (the kernels never mix rows).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from neoxja.cache import KVCache
from neoxja.linear import is_optimized_for_cpu_inference
from neoxja.network import (
    GPTNeoXJapaneseAttention,
    GPTNeoXJapaneseLayer,
    GPTNeoXJapaneseLMHeadModel,
    GPTNeoXJapaneseMLP,
    GPTNeoXJapaneseModel,
)
from neoxja.rope import RotaryEmbedding

# What the C step computes: these modules with these forwards. A model holding any other module, or
# one whose forward was replaced since import (patched, or overridden in a subclass), decodes through
# its PyTorch forward instead.
FUSED_STEP_FORWARDS = {
    cls: cls.forward
    for cls in (
        GPTNeoXJapaneseLMHeadModel,
        GPTNeoXJapaneseModel,
        GPTNeoXJapaneseLayer,
        GPTNeoXJapaneseAttention,
        GPTNeoXJapaneseMLP,
        nn.Linear,
        nn.LayerNorm,
        nn.Embedding,
        nn.ModuleList,
        RotaryEmbedding,
    )
}

ACTIVATIONS = {
    "gelu": 0,
    "gelu_python": 0,
    "gelu_new": 1,
    "gelu_pytorch_tanh": 1,
    "gelu_accurate": 1,
    "gelu_fast": 1,
    "relu": 2,
    "silu": 3,
    "swish": 3,
}
"""Activations the C step computes, by ``config.hidden_act`` (code passed to the extension)."""


@cache
def quantized_forwards() -> dict[type, Any]:
    """The quantized layer classes the C step reads (:mod:`neoxja.quantization.layers`), with the
    forwards they had when imported: a subclass or a replaced forward falls back to PyTorch."""
    from neoxja.quantization import layers

    return {cls: cls.forward for cls in layers.QUANTIZED_FORMATS.values()}


def _is_quantized(module: Any) -> bool:
    return quantized_forwards().get(type(module)) is type(module).forward


def _extension() -> Any:
    try:
        from neoxja import _decode
    except ImportError:
        return None
    return _decode


def extension_available() -> bool:
    """Whether ``neoxja._decode`` was built (``pip install`` compiles it when a C compiler is found)."""
    return _extension() is not None


def matmul(weight: Tensor, x: Tensor) -> Tensor:
    """``x @ weight.T`` (float32, contiguous, on the CPU; ``weight`` [out, in], ``x`` [n, in]) with the
    C step's own matrix kernel and threads: the kernel on its own, for benchmarks and tests."""
    extension = _extension()
    if extension is None:
        raise RuntimeError("the C extension neoxja._decode is not built")
    for name, tensor in (("weight", weight), ("x", x)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-d float32 CPU tensor, got {tensor.dtype} {list(tensor.shape)}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if x.shape[1] != weight.shape[1] or x.shape[0] == 0 or weight.numel() == 0:
        raise ValueError(f"cannot multiply x {list(x.shape)} by weight {list(weight.shape)} transposed")
    out = torch.empty(x.shape[0], weight.shape[0])
    extension.matmul(weight.detach().numpy(), x.detach().numpy(), out.numpy(), torch.get_num_threads())
    return out


def _c_lm_unsupported(model: Any) -> str | None:
    """What both C paths need first: the extension, and neoxja's causal LM class."""
    if not extension_available():
        return "the C extension neoxja._decode is not built"
    if not isinstance(model, GPTNeoXJapaneseLMHeadModel):
        return f"{type(model).__name__} is not a GPTNeoXJapaneseForCausalLM"
    return None


def fused_decoding_unsupported(model: Any, max_length: int) -> str | None:
    """Why :class:`FusedDecoder` would refuse ``model`` (None if it would decode it)."""

    if os.environ.get("NEOXJA_FUSED_DECODE", "1") == "0":
        return "turned off by NEOXJA_FUSED_DECODE=0"
    reason = _c_lm_unsupported(model)
    if reason is not None:
        return reason
    if is_optimized_for_cpu_inference(model):
        return "the weights are packed for oneDNN (optimize_for_cpu_inference)"
    for name, module in model.named_modules():
        kind = GPTNeoXJapaneseLMHeadModel if module is model else type(module)
        if FUSED_STEP_FORWARDS.get(kind) is not type(module).forward and not _is_quantized(module):
            return f"{type(module).__name__} is not a module (or forward) that the C step reproduces"
        if module._forward_hooks or module._forward_pre_hooks:
            return "the model has forward hooks, which only the PyTorch forward runs"
        if _is_quantized(module):
            reason = _quantized_unsupported(module)
            if reason is not None:
                return f"{name}: {reason}"
    if model.training:
        return "the model is in training mode"
    for name, param in model.named_parameters():
        if param.device.type != "cpu" or param.dtype != torch.float32:
            return f"parameter {name} is {param.dtype} on {param.device}, not float32 on the CPU"
        if not param.is_contiguous():
            return f"parameter {name} is not contiguous"
    config = model.config
    if config.hidden_act not in ACTIVATIONS:
        return f"hidden_act={config.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
    rotary = model.gpt_neox_japanese.rotary_emb
    if rotary.rope_type == "longrope" and max_length > rotary.longrope_threshold:
        return "longrope switches frequencies beyond original_max_position_embeddings"
    return None


def _quantized_unsupported(layer: Any) -> str | None:
    """Why the C step cannot read this quantized layer as it is (None if it can)."""
    if layer.bias is not None:
        return "a quantized layer with a bias"
    for name, buffer in layer.named_buffers():
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            return f"its {name} is not a contiguous tensor on the CPU"
    if hasattr(layer, "blocksize"):  # 4-bit: blocks within rows, as the C kernels read them
        blocksize, width = layer.blocksize, layer.in_features
        if blocksize % 32 or width % blocksize:
            return f"blocksize {blocksize} is not a multiple of 32 dividing in_features {width}"
        if _arithmetic(layer) == "fast" and blocksize & (blocksize - 1):
            return f"blocksize {blocksize} is not a power of two (the fast arithmetic's blocks)"
    return None


def _arithmetic(layer: Any) -> str:
    """The arithmetic a quantized layer computes with (its setting, or NEOXJA_CPU_ARITHMETIC's)."""
    from neoxja.quantization.arithmetic import resolve

    return resolve(layer)


def head_matmul_unsupported(model: Any) -> str | None:
    """Why the output head cannot run after ``model``'s PyTorch layers on the C side (None if it can):
    the head and the LM forward must be neoxja's own, unhooked, on the CPU, and the head either a
    float32 ``nn.Linear`` (multiplied by the C step's matrix kernel, :func:`matmul`) or a quantized
    layer (its own forward, on neoxja's kernels). The layers themselves may be anything (quantized,
    packed)."""
    reason = _c_lm_unsupported(model)
    if reason is not None:
        return reason
    if type(model).forward is not FUSED_STEP_FORWARDS[GPTNeoXJapaneseLMHeadModel]:
        return f"{type(model).__name__}.forward is not neoxja's"
    head = model.get_output_embeddings()
    plain = type(head) is nn.Linear and type(head).forward is FUSED_STEP_FORWARDS[nn.Linear]
    if not plain and not _is_quantized(head):
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear or a quantized layer"
    for module in (model, head):
        if module._forward_hooks or module._forward_pre_hooks:
            return "the model or its head has forward hooks, which only the PyTorch forward runs"
    if model.training:
        return "the model is in training mode"
    if not plain:
        return None if head.weight.device.type == "cpu" else f"the head is on {head.weight.device}"
    weight = head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return f"the head's weight is {weight.dtype} on {weight.device}, not contiguous float32 on the CPU"
    if head.bias is not None:
        return "the head has a bias"
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            return f"parameter {name} is {param.dtype}, not float32"
    return None


def head_logits(model: Any, hidden: Tensor) -> Tensor:
    """float32 logits ``[rows, vocab]`` of the last hidden states ``hidden`` [rows, hidden] through
    ``model``'s head, for a model :func:`head_matmul_unsupported` accepts."""
    head = model.get_output_embeddings()
    hidden = hidden.contiguous()
    if type(head) is nn.Linear:
        return matmul(head.weight, hidden.float())
    return head(hidden).float()


def _matrix(module: Any) -> Any:
    """One matrix as ``new_model`` takes it: a float32 array, or a weight tuple of the layer's format
    and arithmetic (numpy views of its buffers; an int8 layer's scale SCB / 127 computed here, as
    :mod:`neoxja.quantization.kernels` computes it)."""
    from neoxja.quantization.layers import Linear4bit, Linear8bit

    if not _is_quantized(module):
        return module.weight.detach().numpy()
    arithmetic = _arithmetic(module)
    if isinstance(module, Linear4bit):
        nested = module.absmax.dtype == torch.uint8
        absmax = module.absmax.numpy()
        return (
            "4bit", module.weight.numpy(), module.code.numpy(), None if nested else absmax,
            absmax if nested else None,
            None if module.nested_absmax is None else module.nested_absmax.numpy(),
            None if module.nested_code is None else module.nested_code.numpy(),
            float(module.offset), module.blocksize, arithmetic,
        )  # fmt: skip
    if isinstance(module, Linear8bit):
        return ("int8", module.weight.numpy(), (module.SCB.float() / 127.0).numpy(), arithmetic)
    return ("bfloat16", module.weight.view(torch.int16).numpy(), arithmetic)


def describe(model: Any) -> str:
    """What the C step runs for ``model``'s matrices, e.g. ``"nf4 with int8 activations
    (avx512-vnni); head float32 (avx512)"``: each format and arithmetic present in the layers, then
    the head's."""
    kernels = _extension().kernels()

    def one(module: Any) -> str:
        if not _is_quantized(module):
            return f"float32 ({kernels['float32']})"
        fmt, arithmetic = module.format_name, _arithmetic(module)
        if arithmetic == "exact":
            return f"{fmt} in float32 ({kernels['exact']})"
        if fmt != "bfloat16":
            return f"{fmt} with int8 activations ({kernels['int8']})"
        if kernels["bfloat16"] == "avx512-bf16":
            return "bfloat16 with bfloat16 activations (avx512-bf16)"
        return f"bfloat16 in float32 ({kernels['bfloat16']}; no AVX512_BF16)"

    layers = []
    for layer in model.gpt_neox_japanese.layers:
        modules = (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h)
        for module in (*modules, layer.mlp.dense_4h_to_h):
            text = one(module)
            if text not in layers:
                layers.append(text)
    return "; ".join(layers) + "; head " + one(model.get_output_embeddings())


def model_arrays(model: Any, cache: KVCache, max_length: int) -> tuple[tuple, list[tuple], tuple]:
    """``(dims, layers, globals)``: what ``neoxja._decode.new_model`` takes to step ``model`` over
    ``cache`` up to ``max_length`` positions (the model's and cache's tensors as numpy views).

    The extension holds these views, with their storage, as long as it lives: a model whose
    parameters are later given other data (``param.data = ...``, ``.to()``) leaves the step
    computing with the weights it was built on, never reading freed memory. It checks every
    array's dtype, layout and size against ``dims``.
    """
    config, base = model.config, model.gpt_neox_japanese

    def array(tensor: Tensor | None) -> Any:
        return None if tensor is None else tensor.detach().numpy()

    layers = []
    for i, layer in enumerate(base.layers):
        attention, mlp = layer.attention, layer.mlp
        layers.append(
            (
                array(layer.input_layernorm.weight),
                array(layer.input_layernorm.bias),
                _matrix(attention.query_key_value),
                _matrix(attention.dense),
                array(attention.dense_bias),  # None except on the last layer
                array(layer.post_attention_layernorm.weight),
                array(layer.post_attention_layernorm.bias),
                _matrix(mlp.dense_h_to_4h),
                _matrix(mlp.dense_4h_to_h),
                array(cache.keys[i]),
                array(cache.values[i]),
            )
        )

    rotary = base.rotary_emb
    half = rotary.rotary_ndims // 2
    positions = torch.arange(max_length).unsqueeze(0)
    cos, sin = rotary._half_cos_sin(torch.empty(0), positions)  # the tables the PyTorch step uses
    if half == 0:  # nothing to rotate: the tables are never read
        cos = sin = torch.zeros(1)
    globals_ = (
        array(base.embed_in.weight),
        _matrix(model.embed_out),
        array(base.final_layer_norm.weight),
        array(base.final_layer_norm.bias),
        array(cos.float().contiguous()),
        array(sin.float().contiguous()),
    )
    dims = (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        2 * half,
        base.layers[0].mlp.dense_h_to_4h.out_features,
        ACTIVATIONS[config.hidden_act],
        cache.batch_size,
        config.vocab_size,
        cache.capacity,
        max_length,
        float(config.layer_norm_eps),
    )
    return dims, layers, globals_


def _array(tensor: Tensor | None) -> Any:
    """A CPU tensor as the extension takes it (a numpy view sharing its memory), or None."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu":
        raise ValueError(f"the C step takes CPU tensors, got one on {tensor.device}")
    return tensor.numpy()


class FusedDecodingUnsupported(ValueError):
    """The model cannot be decoded in C (the message says why); its PyTorch forward still can."""


class FusedDecoder:
    """One token per row (or several: :meth:`verify`) through the whole model in one C call, into a
    preallocated ``cache``.

    ``cache`` must hold every position up to ``max_length`` (generate() allocates it so) and keep
    its buffers: a cache that grew or had rows selected since is refused. The decoder reads the
    model's weights where they are when it is built; it belongs to one generation.
    """

    def __init__(self, model: Any, cache: KVCache, max_length: int) -> None:
        reason = fused_decoding_unsupported(model, max_length)
        if reason is not None:
            raise FusedDecodingUnsupported(f"cannot decode {type(model).__name__} in C: {reason}")
        config = model.config
        if cache.dtype != torch.float32 or cache.device.type != "cpu" or cache.capacity < max_length:
            raise ValueError(
                f"the cache must be float32 on the CPU with room for {max_length} positions, got {cache!r}"
            )
        dims, layers, globals_ = model_arrays(model, cache, max_length)
        extension = _extension()
        self._handle = extension.new_model(dims, layers, globals_)
        self._run_step = extension.step
        self._run_slots = extension.step_slots
        self._run_verify = extension.verify
        self._keys = cache.keys[0]
        self.cache = cache
        self.max_length = max_length
        self.batch_size = cache.batch_size
        self.logits = torch.empty(cache.batch_size, config.vocab_size)
        self._logits_array = self.logits.numpy()

    def _check_cache(self) -> None:
        if self.cache.keys[0] is not self._keys:
            raise RuntimeError(
                "the KV cache was reallocated (grown or rows selected) since the decoder was built"
            )

    def step(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        position_delta: int = 0,
        mask: Tensor | None = None,
        argmax_out: Tensor | None = None,
    ) -> Tensor:
        """Feed ``tokens`` (int64 ``[batch]``, any stride) at the cache's next position; returns the
        logits ``[batch, vocab]`` (a buffer the next step overwrites) and advances the cache.

        ``positions`` (int64, ``batch`` contiguous values) plus ``position_delta`` are the RoPE
        positions (default: the cache position); ``mask`` ``[batch, >= length + 1]`` int64 with unit
        stride along positions marks the keys each row may see (0 = padding); ``argmax_out`` (int64
        ``[batch]``, any stride) receives each row's greedy token.
        """
        cache = self.cache
        self._check_cache()
        for name, tensor in (("tokens", tokens), ("argmax_out", argmax_out)):
            if tensor is not None and (tensor.dtype != torch.int64 or tensor.shape != (self.batch_size,)):
                raise ValueError(
                    f"{name} must be int64 of shape [{self.batch_size}], got {tensor.dtype} "
                    f"{list(tensor.shape)}"
                )
        if positions is not None and (
            positions.dtype != torch.int64
            or positions.numel() != self.batch_size
            or not positions.is_contiguous()
        ):
            raise ValueError(f"positions must be {self.batch_size} contiguous int64 values")
        t = cache.length
        if mask is not None and (
            mask.dtype != torch.int64
            or mask.dim() != 2
            or mask.shape[0] != self.batch_size
            or mask.shape[1] <= t
            or mask.stride(1) != 1
        ):
            raise ValueError(
                f"mask must be int64 [{self.batch_size}, > {t}] with unit stride along positions"
            )
        self._run_step(
            self._handle,
            self.batch_size,
            t,
            _array(tokens),
            None if positions is None else _array(positions.view(-1)),
            position_delta,
            _array(mask),
            self._logits_array,
            _array(argmax_out),
            torch.get_num_threads(),
        )
        cache.advance(1)
        return self.logits

    def step_slots(
        self, tokens: Tensor, slots: Tensor, lengths: Tensor, argmax_out: Tensor | None = None
    ) -> Tensor:
        """Feed one token per row, each row at its own place in the cache: row ``b`` uses cache row
        ``slots[b]``, whose first ``lengths[b]`` positions are filled, and its token goes (and is
        rotated) at position ``lengths[b]``. All three are contiguous int64 ``[rows]``, ``rows`` at most
        the cache's batch size, the slots distinct. Returns the logits ``[rows, vocab]`` (a view of a
        buffer the next step overwrites); ``argmax_out`` (contiguous int64 ``[rows]``) receives each
        row's greedy token. Each row's numbers are those of a batch of one (the kernels never mix
        rows), which is what lets a server batch requests without changing their results. The caller
        keeps the lengths: ``cache.length`` is not touched.
        """
        self._check_cache()
        rows = tokens.shape[0] if tokens.dim() == 1 else -1
        named = (("tokens", tokens), ("slots", slots), ("lengths", lengths), ("argmax_out", argmax_out))
        for name, tensor in named:
            if tensor is not None and (
                tensor.dtype != torch.int64 or tensor.shape != (rows,) or not tensor.is_contiguous()
            ):
                raise ValueError(
                    f"{name} must be contiguous int64 of shape [rows] like tokens, got {tensor.dtype} "
                    f"{list(tensor.shape)}"
                )
        if not 0 < rows <= self.batch_size:
            raise ValueError(f"step_slots takes 1 to {self.batch_size} rows, got {rows}")
        self._run_slots(
            self._handle,
            rows,
            _array(tokens),
            _array(slots),
            _array(lengths),
            self._logits_array,
            _array(argmax_out),
            torch.get_num_threads(),
        )
        return self.logits[:rows]

    def verify(self, tokens: Tensor, argmax_out: Tensor | None = None) -> Tensor:
        """Feed several tokens per row at once (verifying draft tokens): ``tokens`` int64 ``[rows,
        count]`` (any strides; ``rows`` at most the cache's batch) go into cache rows ``0..rows-1`` at
        the cache's next ``count`` positions, each attending to the positions up to its own, as the
        model's forward over them would (no padding). Returns new float32 logits ``[rows, count,
        vocab]``, those after each token; ``argmax_out`` (contiguous int64 ``[rows, count]``) receives
        each one's greedy token. The cache advances by ``count``: crop it to drop rejected tokens. The
        whole forward is one C call, reading each weight once for all ``rows * count`` tokens.
        """
        cache = self.cache
        self._check_cache()
        if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be int64 [rows, count], got {tokens.dtype} {list(tokens.shape)}")
        rows, count = tokens.shape
        if rows > self.batch_size:
            raise ValueError(f"verify takes 1 to {self.batch_size} rows, got {rows}")
        start = cache.length
        if start + count > self.max_length:  # (the cache holds max_length positions: __init__)
            raise ValueError(
                f"verify: {count} tokens after the cache's {start} positions exceed the {self.max_length} "
                "positions the decoder was built for"
            )
        if argmax_out is not None and (
            argmax_out.dtype != torch.int64
            or argmax_out.shape != (rows, count)
            or not argmax_out.is_contiguous()
        ):
            raise ValueError(
                f"argmax_out must be contiguous int64 of shape [{rows}, {count}], got {argmax_out.dtype} "
                f"{list(argmax_out.shape)}"
            )
        logits = torch.empty(rows, count, self.logits.shape[1])
        self._run_verify(
            self._handle,
            _array(tokens),
            start,
            logits.numpy(),
            None if argmax_out is None else _array(argmax_out.view(-1)),
            torch.get_num_threads(),
        )
        cache.advance(count)
        return logits
