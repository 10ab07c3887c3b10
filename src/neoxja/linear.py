"""Linear layers, and their fast path for CPU inference.

:class:`Linear` is the ``nn.Linear`` every layer of the model uses (same parameters, same state-dict
keys). On a CPU in float32, PyTorch's default kernels multiply a small batch of vectors (decoding)
by a row-major weight well below what memory allows; oneDNN multiplies the same matrix, stored once
in its own blocked layout ("packed"), faster, most of all for the few rows of decoding (the
"dense weights" row of benchmarks/bench_model.py and the decoding benchmarks show by how much).
:func:`optimize_for_cpu_inference` packs every large float32 CPU weight of a model in eval mode.
The model does it by itself on its first forward in eval mode without autograd
(``torch.no_grad()``/``inference_mode()``); :func:`restore_dense` unpacks and turns that off for
the model, :func:`no_auto_packing` for a block of code. ``generate()`` decodes in C over the dense
weights where it can (:mod:`neoxja.cpu_decode`) and then runs its prompt without packing.

What a packed layer keeps and what it guarantees:

* no second copy of the weights: an untied weight is replaced by its packed form. Its
  ``Parameter`` object stays registered (an optimizer or a ``requires_grad`` flag set meanwhile
  keeps working) with the same shape and dtype, but while packed it holds a zero-memory NaN
  placeholder (a single NaN, expanded): read weights through ``layer.weight`` or ``state_dict()``,
  not ``parameters()``, or call :func:`restore_dense` first. A weight shared
  with another module (the input embedding, when the output head is tied to it) stays as it is
  and the layer packs a private copy: the embedding needs row lookups. The copy is dropped when
  the shared weight is written in place (its version counter moves), except through ``.data``,
  which PyTorch does not track: after such a write, call :func:`restore_dense` (then
  :func:`optimize_for_cpu_inference` to pack again);
* reading ``layer.weight``, ``state_dict()``, ``load_state_dict()``, ``model.train()``, ``.to()``,
  ``copy.deepcopy`` and ``save_pretrained`` all see (or first restore) the ordinary dense weight,
  with the same values bit for bit; a forward that autograd records (oneDNN's kernel has no
  backward) unpacks the layers it runs through;
* outputs equal ``F.linear``'s up to float rounding (oneDNN sums in another order), within 1e-5
  relative in float32.

Packing and unpacking hold a lock, so two threads never pack the same layer twice (which would
pack a placeholder). A forward running in another thread *while* a layer is being packed may still
read the placeholder, so a multi-threaded server should pack once at load
(:func:`optimize_for_cpu_inference`) rather than let its first concurrent requests do it.

Only weights of at least :data:`MIN_PACKED_ELEMENTS` are packed: oneDNN's fixed cost per call
(tens of microseconds) outweighs its gain on tiny matrices. Without oneDNN (``torch.backends.mkldnn``) nothing
is packed and every layer runs ``F.linear``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_PACKED_ELEMENTS = 1 << 18  # 1 MiB of float32
_unpack_count = [0]  # bumped by every Linear.unpack, so that models know when to pack again
_PACK_MARK = "_neoxja_packed_at"
_LOCK = threading.RLock()  # packing and unpacking swap tensors in several steps
_AUTO_PACK = ContextVar("neoxja_auto_pack", default=True)


def _placeholder(weight: Tensor) -> Tensor:
    """A tensor of ``weight``'s shape and dtype over a single NaN: no memory, and any use shows."""
    return torch.full((1,), float("nan"), dtype=weight.dtype).expand(weight.shape)


def packing_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels that packing needs."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class Linear(nn.Linear):
    """``nn.Linear`` that can compute from a oneDNN-packed copy of its weight (see module docstring)."""

    _packed: Tensor | None = None  # the packed weight, when packed
    _dense_dropped = False  # whether the dense weight was replaced by a placeholder while packed
    _shared_version: int | None = None  # weight._version at packing time, when the dense weight is kept

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters  # direct reads: module attribute lookup costs more than small matmuls
        packed = self._packed
        if packed is not None:
            weight = params["weight"]
            # oneDNN's kernel has no backward: with autograd recording, compute densely. And a kept
            # (shared) dense weight that was written in place since packing makes the copy stale.
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            if not needs_grad and (self._shared_version is None or self._shared_version == weight._version):
                return torch.ops.mkldnn._linear_pointwise(x, packed, params["bias"], "none", [], "")
            self.unpack()
        return F.linear(x, params["weight"], params["bias"])

    @property
    def is_packed(self) -> bool:
        """Whether the layer currently computes from a packed weight."""
        return self._packed is not None

    @torch.inference_mode(False)
    @torch.no_grad()
    def pack(self, keep_dense: bool = False) -> bool:
        """Pack the weight for oneDNN if it is a large float32 CPU matrix; returns whether it is packed.

        ``keep_dense``: the weight is shared with another module, so keep it and pack a copy.
        """
        weight = self._parameters["weight"]
        if (
            weight.device.type != "cpu"
            or weight.dtype != torch.float32
            or weight.numel() < MIN_PACKED_ELEMENTS
            or not packing_available()
        ):
            return False
        with _LOCK:  # two threads packing one layer would pack the placeholder of the other
            if self._packed is not None:
                return True
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.__dict__["_shared_version"] = weight._version if keep_dense else None
            # The packed weight is in place before the dense one goes.
            self.__dict__["_packed"] = packed
            if not keep_dense:
                # Free the dense storage but keep the Parameter object (optimizers and requires_grad
                # flags refer to it) with the same shape, as a NaN placeholder that takes no memory.
                weight.data = _placeholder(weight)
                self.__dict__["_dense_dropped"] = True
        return True

    @torch.inference_mode(False)  # the weight must stay an ordinary tensor that can be trained
    @torch.no_grad()
    def unpack(self) -> None:
        """Go back to the ordinary dense weight (bit-identical to the one packed)."""
        with _LOCK:
            packed = self._packed
            if packed is None:
                return
            _unpack_count[0] += 1
            if self._dense_dropped:  # the dense weight is back before the packed one goes
                self._parameters["weight"].data = packed.to_dense()
                self.__dict__["_dense_dropped"] = False
            self.__dict__["_packed"] = None
            self.__dict__["_shared_version"] = None

    # Everything that looks at the weight from outside sees the dense one.

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and self._dense_dropped:
            self.unpack()
        return super().__getattr__(name)

    def train(self, mode: bool = True) -> Linear:
        if mode:
            self.unpack()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear:
        self.unpack()
        _unpack_count[0] += 1  # device or dtype may change: models look again at whether to pack
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._dense_dropped:
            destination[prefix + "weight"] = self._packed.to_dense()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles get the dense weight (oneDNN's packed tensors cannot be copied)."""
        state = dict(self.__dict__)
        state.pop("_shared_version", None)
        state.pop("_packed", None)
        if state.pop("_dense_dropped", False):
            original = self._parameters["weight"]
            dense = nn.Parameter(self._packed.to_dense(), original.requires_grad)
            state["_parameters"] = {**state["_parameters"], "weight": dense}
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + (", packed=True" if self._packed is not None else "")


def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Pack the large float32 CPU weights of every :class:`Linear` in ``model`` for oneDNN; returns
    ``model``.

    Calling it again is cheap (already packed layers are skipped). Raises ``RuntimeError`` if the
    model is in training mode: packed weights are for inference; ``model.train()`` unpacks them.
    """
    if model.training:
        raise RuntimeError(
            "optimize_for_cpu_inference needs a model in eval mode (model.eval()); packed weights are "
            "for inference, and model.train() restores the ordinary ones"
        )
    users: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            users[id(param)] = users.get(id(param), 0) + 1
    for linear in (m for m in model.modules() if isinstance(m, Linear)):
        linear.pack(keep_dense=users[id(linear._parameters["weight"])] > 1)
    _mark(model, _unpack_count[0])
    return model


def _mark(model: nn.Module, value: int | str) -> None:
    # On every submodule too: a causal LM's forward calls its bare model's forward, which checks.
    for module in model.modules():
        module.__dict__[_PACK_MARK] = value


def pack_for_inference(model: nn.Module) -> None:
    """Pack ``model`` if it is a float32 CPU model running without autograd in eval mode.

    The model's forward calls this; it costs a few attribute reads once packed, and packs again
    after any layer went back to its dense weight (``.weight`` read, ``train()``, ...).
    """
    mark = model.__dict__.get(_PACK_MARK)
    if model.training or torch.is_grad_enabled() or mark == _unpack_count[0] or mark == "off":
        return
    if not _AUTO_PACK.get():
        return
    if not packing_available():
        _mark(model, "off")
        return
    weight = next(model.parameters(), None)
    with _LOCK:
        if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
            optimize_for_cpu_inference(model)
        else:  # not eligible now; look again after the next unpack or move anywhere (e.g. .float())
            _mark(model, _unpack_count[0])


@contextmanager
def no_auto_packing() -> Iterator[None]:
    """Within the block (in this thread), forwards do not pack models by themselves.

    ``generate()`` runs its prompt this way when its decoding steps read the dense weights
    (:mod:`neoxja.cpu_decode`); explicit :func:`optimize_for_cpu_inference` calls still pack.
    """
    token = _AUTO_PACK.set(False)
    try:
        yield
    finally:
        _AUTO_PACK.reset(token)


def restore_dense(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_for_cpu_inference`: every weight an ordinary dense tensor again, and no
    automatic packing of this model until :func:`optimize_for_cpu_inference` is called again."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.unpack()
    _mark(model, "off")
    return model


def is_optimized_for_cpu_inference(model: nn.Module) -> bool:
    """Whether any :class:`Linear` of ``model`` currently computes from a packed weight."""
    return any(isinstance(m, Linear) and m.is_packed for m in model.modules())
