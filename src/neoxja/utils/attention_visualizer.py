"""Show which tokens may attend to which: :class:`AttentionMaskVisualizer`, as in the seed's example.

``AttentionMaskVisualizer("abeja/gpt-neox-japanese-2.7b")("吾輩は猫である")`` prints a grid with one
row per query token (labelled with the token) and one column per key position: ``■`` where the
model lets the query attend to the key, ``⬚`` where the mask forbids it, the diagonal in green. A
list of texts is left-padded into one batch, as generation does, and each row of the batch gets
its own grid, whose legend says which positions are padding: no real token attends to them, and
each padding query attends only to itself (so its softmax has a key; its output is unused).
Printing the mask needs only the config and the tokenizer; ``png=...`` with ``layer``/``head`` also
runs the model to draw its attention weights. The PNG's token labels use a Japanese font:
matplotlib-fontja's (``pip install 'neoxja[viz]'``), else one installed on the system; their size
(``font_size``, points) and the image's ``dpi`` are the caller's, the figure sized to fit them.
"""

from __future__ import annotations

import functools
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import torch

GREEN = "\033[92m"
RESET = "\033[0m"
ALLOWED = "■"
MASKED = "⬚"
# Characters a font must have to draw the Japanese token labels (kana and a common kanji).
JAPANESE_SAMPLE = "あア猫"
# The PNG's defaults: token labels at 10 pt drawn at 150 dpi are 21 px tall, where a kanji's strokes stay
# apart (matplotlib's 7 pt at 100 dpi gave 10 px, unreadable).
DEFAULT_DPI = 150
DEFAULT_FONT_SIZE = 10.0


def allowed_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` booleans: may query ``i`` of row ``b`` attend to key ``j``?

    Built by the model's own mask function (:func:`neoxja.modeling.build_attention_mask`) for a
    prompt of ``T`` tokens with this padding mask, so the grid shows exactly what the model applies:
    causal, padding keys masked, and a padding query attending only to itself.
    """
    from neoxja.network import build_attention_mask

    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len], got shape {tuple(attention_mask.shape)}")
    batch, length = attention_mask.shape
    positions = torch.arange(length, device=attention_mask.device)
    mask, _ = build_attention_mask(attention_mask, positions, length, batch)
    if mask is None:  # no padding: the model uses plain causal attention
        mask = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()[None, None]
    return mask[:, 0].expand(batch, length, length)


def format_grid(tokens: list[str], allowed: torch.Tensor, *, color: bool = False, padding: int = 0) -> str:
    """The grid of ``allowed`` (``[T, T]``) with ``tokens`` as row labels and indices as column labels.

    ``padding`` is the number of left-padding positions, which the legend then names.
    """
    n = len(tokens)
    if tuple(allowed.shape) != (n, n):
        raise ValueError(f"allowed must be [{n}, {n}] for {n} tokens, got shape {tuple(allowed.shape)}")
    if not 0 <= padding < n:
        raise ValueError(f"padding must be in [0, {n}) for {n} tokens, got {padding}")
    labels = [repr(token) for token in tokens]
    label_width = max(_width(label) for label in labels)
    index_width = len(str(n - 1))
    diagonal = f"{GREEN}{ALLOWED}{RESET}" if color else ALLOWED
    legend = f"{ALLOWED}: may attend   {MASKED}: masked"
    lines = [f" {diagonal}: i == j (diagonal)   {legend}" if color else f" {legend}"]
    if padding:
        span = "0" if padding == 1 else f"0-{padding - 1}"
        lines.append(
            f" positions {span} are left padding: no real token attends to them ({MASKED}); a padding "
            f"query attends only to itself ({ALLOWED} on the diagonal), and its output is unused"
        )
    indent = " " * (label_width + 2 + index_width + 1)
    for digit in range(index_width):  # column numbers, written vertically
        lines.append(indent + " ".join(str(j).rjust(index_width)[digit] for j in range(n)))
    rows = allowed.tolist()
    for i, label in enumerate(labels):
        cells = " ".join(
            diagonal if i == j and rows[i][j] else ALLOWED if rows[i][j] else MASKED for j in range(n)
        )
        padding = " " * (label_width - _width(label))
        lines.append(f"{label}{padding}: {str(i).rjust(index_width)} {cells}")
    return "\n".join(lines)


class AttentionMaskVisualizer:
    """Print (and optionally draw) the attention mask of GPT-NeoX-Japanese for some text.

    ``model`` is a Hub id, a model directory or a loaded model; ``tokenizer`` defaults to the
    model's own. For an id or directory only the config and tokenizer are read until attention
    weights are asked for (``png=`` with ``layer``/``head``), which loads the weights.
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        tokenizer: Any = None,
        *,
        dtype: Any = None,
        device: Any = None,
        color: bool | None = None,
    ) -> None:
        from neoxja.pipelines import load_tokenizer

        if isinstance(model, (str, os.PathLike)):
            from neoxja.auto import AutoConfig

            self.name = str(model)
            self.config = AutoConfig.from_pretrained(model)
            self.model = None
        else:
            self.model = model
            self.config = model.config
            self.name = getattr(model, "name_or_path", None) or type(model).__name__
        self._dtype, self._device = dtype, device
        if tokenizer is None and self.model is not None and self.name == type(model).__name__:
            raise ValueError("tokenizer= is required when model= is a model object without a name_or_path")
        self.tokenizer = load_tokenizer(self.name) if tokenizer is None else tokenizer
        if isinstance(self.tokenizer, (str, os.PathLike)):
            self.tokenizer = load_tokenizer(self.tokenizer)
        self.color = color

    def __call__(
        self,
        input_sentence: str | list[str],
        *,
        png: str | os.PathLike | None = None,
        layer: int | None = None,
        head: int | None = None,
        dpi: float = DEFAULT_DPI,
        font_size: float = DEFAULT_FONT_SIZE,
    ) -> None:
        """Print the mask grid(s) for the text(s); with ``png`` also write an image (see :meth:`save_png`)."""
        color = self.color if self.color is not None else _stdout_is_terminal()
        print(self.render(input_sentence, color=color))
        if png is not None:
            self.save_png(png, input_sentence, layer=layer, head=head, dpi=dpi, font_size=font_size)

    def encode(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of ``texts`` as one left-padded batch ``[B, T]``."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or any(not isinstance(text, str) or not text for text in batch):
            raise ValueError("input_sentence must be a non-empty string or a list of non-empty strings")
        encoded = [list(self.tokenizer.encode(text)) for text in batch]
        length = max(len(ids) for ids in encoded)
        max_positions = self.config.max_position_embeddings
        if length > max_positions:
            raise ValueError(
                f"input_sentence has {length} tokens, more than max_position_embeddings={max_positions}"
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded])
        return input_ids, attention_mask

    def mask(self, texts: str | list[str]) -> tuple[list[list[str]], torch.Tensor]:
        """The tokens of each batch row and the ``[B, T, T]`` boolean mask the model applies to them."""
        tokens, _, allowed = self._tokens_and_mask(texts)
        return tokens, allowed

    def _tokens_and_mask(self, texts: str | list[str]) -> tuple[list[list[str]], list[int], torch.Tensor]:
        """:meth:`mask`'s tokens and mask, with the number of left-padding positions of each row between."""
        input_ids, attention_mask = self.encode(texts)
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens, paddings = [], []
        for text, ids, mask in zip(texts, input_ids.tolist(), attention_mask.tolist(), strict=True):
            padding = mask.count(0)
            words = list(self.tokenizer.tokenize(text))  # labels as the tokenizer spells them (e.g. <SP>)
            if len(words) != len(ids) - padding:
                words = self.tokenizer.convert_ids_to_tokens(ids[padding:])
            tokens.append(self.tokenizer.convert_ids_to_tokens(ids[:padding]) + words)
            paddings.append(padding)
        return tokens, paddings, allowed_positions(attention_mask)

    def render(self, texts: str | list[str], *, color: bool = False) -> str:
        """The text :meth:`__call__` prints: a title box, then one grid per batch row."""
        tokens, paddings, allowed = self._tokens_and_mask(texts)
        title = f"Attention visualization for {self.config.model_type}:{self.name} (causal mask)"
        border = "#" * (len(title) + 8)
        lines = [border, f"##  {title}  ##", border]
        for row, (row_tokens, padding) in enumerate(zip(tokens, paddings, strict=True)):
            if len(tokens) > 1:
                lines.append(f"batch row {row}" + (f" ({padding} left-padding positions)" if padding else ""))
            lines.append(format_grid(row_tokens, allowed[row], color=color, padding=padding))
        lines.append(border)
        return "\n".join(lines)

    def attention_weights(self, texts: str | list[str], layer: int, head: int) -> torch.Tensor:
        """``[B, T, T]`` attention probabilities of ``head`` in ``layer`` (runs the model)."""
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if not 0 <= layer < layers:
            raise ValueError(f"layer={layer} is out of range: the model has layers 0..{layers - 1}")
        if not 0 <= head < heads:
            raise ValueError(f"head={head} is out of range: the model has heads 0..{heads - 1}")
        model = self._loaded_model()
        input_ids, attention_mask = self.encode(texts)
        device = next(model.parameters()).device
        with torch.inference_mode():
            outputs = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_attentions=True,
            )
        return outputs.attentions[layer][:, head].float().cpu()

    def save_png(
        self,
        path: str | os.PathLike,
        texts: str | list[str],
        *,
        layer: int | None = None,
        head: int | None = None,
        dpi: float = DEFAULT_DPI,
        font_size: float = DEFAULT_FONT_SIZE,
    ) -> Path:
        """Draw the mask (or ``layer``/``head``'s attention weights) of each batch row into ``path``.

        The token labels are ``font_size`` points and the image ``dpi`` pixels per inch; the figure is
        sized to fit them (a cell per token a little over a label's height, room for the longest label).
        """
        if (layer is None) != (head is None):
            raise ValueError(
                "give both layer and head to draw attention weights, or neither to draw the mask"
            )
        for name, value in (("dpi", dpi), ("font_size", font_size)):
            if not (isinstance(value, (int, float)) and 0 < value < 10_000):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        figure_class = _figure_class()
        from matplotlib import rc_context, rcParams

        family = japanese_font_family()
        tokens, allowed = self.mask(texts)
        if layer is None:
            images, what = allowed.float(), "attention mask (1 = may attend)"
        else:
            images, what = (
                self.attention_weights(texts, layer, head),
                f"attention weights, layer {layer} head {head}",
            )
        batch, length = images.shape[0], images.shape[-1]
        labels = [[f"{i}:{token}" for i, token in enumerate(row)] for row in tokens]
        width, height = _panel_size(labels, font_size)
        path = Path(path)
        # The Japanese font first, the user's fonts as fallback; only for this figure (rcParams restored).
        fonts = {"font.family": [family, *rcParams["font.family"]]} if family else {}
        with rc_context(fonts), warnings.catch_warnings():
            if family is None:  # japanese_font_family() has warned once; not once per missing glyph
                warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font", UserWarning)
            figure = figure_class(figsize=(width * batch, height))
            axes = figure.subplots(1, batch, squeeze=False)
            for row in range(batch):
                ax = axes[0][row]
                shown = ax.imshow(images[row].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_xticks(range(length), labels=labels[row], rotation=90, fontsize=font_size)
                ax.set_yticks(range(length), labels=labels[row], fontsize=font_size)
                ax.set_xlabel("key", fontsize=font_size)
                ax.set_ylabel("query", fontsize=font_size)
                title = what + (f", batch row {row}" if batch > 1 else "")
                ax.set_title(title, fontsize=font_size * 1.2)
                colorbar = figure.colorbar(shown, ax=ax, fraction=0.046)
                colorbar.ax.tick_params(labelsize=font_size)
            figure.tight_layout()
            figure.savefig(path, dpi=dpi)
        return path

    def _loaded_model(self) -> torch.nn.Module:
        if self.model is None:
            from neoxja.auto import AutoModelForCausalLM
            from neoxja.devices import resolve_device, resolve_dtype

            kwargs: dict[str, Any] = {}
            if self._dtype is not None:
                kwargs["dtype"] = resolve_dtype(self._dtype)
            if self._device is not None:
                kwargs["device"] = resolve_device(self._device)
            self.model = AutoModelForCausalLM.from_pretrained(self.name, **kwargs).eval()
        return self.model


def _panel_size(labels: list[list[str]], font_size: float) -> tuple[float, float]:
    """(width, height) in inches of one batch row's panel: a cell per token a little over a label's
    height, the longest label (a CJK character about 1 em wide, others about 0.6) beside and below the
    grid, room for the axis names, the title and the colour bar; at least 4 inches."""
    em = font_size / 72
    cells = max(len(row) for row in labels) * max(0.25, 1.5 * em)
    label = max(sum(1.0 if _width(c) == 2 else 0.6 for c in text) for row in labels for text in row) * em
    width = cells + label + 6 * em + 0.8  # y labels, axis name; colour bar and its ticks
    height = cells + label + 6 * em + 0.3  # x labels, axis name; title
    return max(4.0, width), max(4.0, height)


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _figure_class() -> type:
    """matplotlib's ``Figure`` (used without pyplot, so no GUI backend or global state is touched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "writing a PNG needs matplotlib, an optional dependency: pip install 'neoxja[viz]'"
        ) from err
    return Figure


@functools.cache
def japanese_font_family() -> str | None:
    """The family name of a font that has Japanese glyphs, registered with matplotlib, or None.

    matplotlib-fontja's font (IPAexGothic) when that package is installed, else the first
    installed font that has :data:`JAPANESE_SAMPLE`. With neither, warns once (naming the ``viz``
    extra) and returns None: the labels then show their Japanese characters as empty boxes.
    """
    from matplotlib import font_manager, rc_context

    try:
        with rc_context():  # importing it runs japanize(), which sets the global font family
            import matplotlib_fontja
    except ImportError:
        pass
    else:  # the import also registered the font with matplotlib
        return font_manager.FontProperties(fname=matplotlib_fontja.get_font_ttf_path()).get_name()
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda entry: (entry.name, entry.fname)):
        if _has_glyphs(entry.fname, JAPANESE_SAMPLE):
            return entry.name
    warnings.warn(
        "no Japanese font found for matplotlib: the PNG's Japanese token labels will be empty boxes. "
        "Install one with: pip install 'neoxja[viz]' (it brings matplotlib-fontja)",
        UserWarning,
        stacklevel=3,
    )
    return None


def _has_glyphs(font_path: str, text: str) -> bool:
    """Does the font file at ``font_path`` have a glyph for every character of ``text``?"""
    from matplotlib.ft2font import FT2Font

    try:
        charmap = FT2Font(font_path).get_charmap()
    except (OSError, RuntimeError):  # unreadable or not a font FreeType knows
        return False
    return all(ord(char) in charmap for char in text)


def _stdout_is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()
