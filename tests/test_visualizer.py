"""AttentionMaskVisualizer prints the mask the model applies (checked against its attention weights)."""

from __future__ import annotations

import io
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_checkpoint

import neoxja
from neoxja.utils import attention_visualizer
from neoxja.utils.attention_visualizer import ALLOWED, MASKED, AttentionMaskVisualizer

TEXTS = ["猫", "吾輩は猫である。", "名前はまだ無い"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir, seed=3)


@pytest.fixture(scope="module")
def visualizer(tiny_dir: Path) -> AttentionMaskVisualizer:
    return AttentionMaskVisualizer(str(tiny_dir))


def parse_grids(text: str) -> list[tuple[list[str], list[list[bool]]]]:
    """(row labels, cells) of every grid in the printed output."""
    grids: list[tuple[list[str], list[list[bool]]]] = []
    row = re.compile(r"^(?P<label>'.*'|\".*\") *: *(?P<index>\d+) (?P<cells>[■⬚ ]+)$")
    for line in text.splitlines():
        match = row.match(line)
        if not match:
            continue
        if int(match["index"]) == 0:
            grids.append(([], []))
        labels, cells = grids[-1]
        labels.append(eval(match["label"]))  # the label is repr(token)
        cells.append([cell == ALLOWED for cell in match["cells"].split(" ")])
    return grids


def model_mask(tiny_dir: Path, visualizer: AttentionMaskVisualizer, texts) -> torch.Tensor:
    """Where the model's attention weights are non-zero, in every layer and head: ``[B, T, T]``."""
    model = neoxja.AutoModelForCausalLM.from_pretrained(tiny_dir)
    input_ids, attention_mask = visualizer.encode(texts)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    weights = torch.stack(out.attentions)  # [layers, B, heads, T, T]
    nonzero = weights > 0
    assert torch.equal(nonzero.all(dim=(0, 2)), nonzero.any(dim=(0, 2)))  # all heads agree
    return nonzero.any(dim=(0, 2))


def test_printed_grid_is_the_mask_the_model_applies(
    tiny_dir: Path, visualizer: AttentionMaskVisualizer, capsys: pytest.CaptureFixture
) -> None:
    visualizer(TEXTS[1])
    out = capsys.readouterr().out
    [(labels, cells)] = parse_grids(out)
    assert labels == visualizer.tokenizer.tokenize(TEXTS[1])
    assert cells == model_mask(tiny_dir, visualizer, TEXTS[1])[0].tolist()
    assert "gpt_neox_japanese" in out


def test_left_padded_batch_grid_per_row(
    tiny_dir: Path, visualizer: AttentionMaskVisualizer, capsys: pytest.CaptureFixture
) -> None:
    visualizer(TEXTS)
    grids = parse_grids(capsys.readouterr().out)
    expected = model_mask(tiny_dir, visualizer, TEXTS)
    input_ids, attention_mask = visualizer.encode(TEXTS)
    assert len(grids) == len(TEXTS)
    for row, (labels, cells) in enumerate(grids):
        assert labels == visualizer.tokenizer.convert_ids_to_tokens(input_ids[row].tolist())
        assert cells == expected[row].tolist()
        padding = int((attention_mask[row] == 0).sum())
        # Left padding: the padding columns are masked for every real token of the row.
        assert all(not cell for line in cells[padding:] for cell in line[:padding])
    assert int((attention_mask[0] == 0).sum()) > 0


@pytest.mark.parametrize("color", [False, True])
def test_legend_explains_every_symbol_drawn_for_a_padded_batch(
    tiny_dir: Path, visualizer: AttentionMaskVisualizer, color: bool
) -> None:
    """Each symbol in each grid is in that grid's legend, and means there what the legend says."""
    blocks = visualizer.render(TEXTS, color=color).split("batch row ")[1:]
    allowed = model_mask(tiny_dir, visualizer, TEXTS).tolist()
    _, attention_mask = visualizer.encode(TEXTS)
    holds = {
        "may attend": lambda row, i, j: allowed[row][i][j],
        "masked": lambda row, i, j: not allowed[row][i][j],
        "i == j (diagonal)": lambda row, i, j: i == j,
    }
    assert len(blocks) == len(TEXTS)
    for row, block in enumerate(blocks):
        lines = block.splitlines()
        legend = dict(re.findall(r"(\S+): (.+?)(?:   |$)", lines[1].strip()))
        assert set(legend.values()) == ({*holds} if color else {"may attend", "masked"})
        cells = [
            match[1].split(" ")
            for line in lines
            if (match := re.match(r"^(?:'.*'|\".*\") *: *\d+ (.*)$", line))
        ]
        assert len(cells) == len(allowed[row])
        for i, line in enumerate(cells):
            for j, symbol in enumerate(line):
                assert symbol in legend and holds[legend[symbol]](row, i, j), (row, i, j, symbol)
        padding = int((attention_mask[row] == 0).sum())
        note = re.search(r"positions 0(?:-(\d+))? are left padding", block)
        assert (note is not None) == (padding > 0) and lines[0].startswith(str(row))
        if padding:
            assert int(note[1] or 0) == padding - 1 and f"({padding} left-padding positions)" in lines[0]
            # The note's claims: real tokens never see a padding column, padding rows only themselves.
            assert all(line[j] == MASKED for line in cells[padding:] for j in range(padding))
            for i, line in enumerate(cells[:padding]):
                assert [symbol != MASKED for symbol in line] == [i == j for j in range(len(line))]
    assert int((attention_mask[0] == 0).sum()) > 0


def test_grid_matches_transformers_visualizer_cells(
    tiny_dir: Path, visualizer: AttentionMaskVisualizer, capsys: pytest.CaptureFixture
) -> None:
    from transformers.utils.attention_visualizer import AttentionMaskVisualizer as Reference

    Reference(str(tiny_dir))(TEXTS[1])
    reference = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    reference_cells = [
        [cell != MASKED for cell in line.split(":", 1)[1].split("|")[0].split()[1:]]
        for line in reference.splitlines()
        if re.match(r"^'.*' *: +\d+ ", line)
    ]
    visualizer(TEXTS[1])
    [(_, cells)] = parse_grids(capsys.readouterr().out)
    assert cells == reference_cells


def test_loaded_model_and_png_outputs(tiny_dir: Path, tmp_path: Path) -> None:
    model = neoxja.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = neoxja.AutoTokenizer.from_pretrained(tiny_dir)
    visualizer = neoxja.AttentionMaskVisualizer(model, tokenizer, color=False)
    text = visualizer.render(TEXTS)
    assert "\x1b[" not in text and text.count("batch row") == 3
    weights = visualizer.attention_weights(TEXTS[1], layer=1, head=2)
    input_ids, attention_mask = visualizer.encode(TEXTS[1])
    with torch.no_grad():
        expected = model(input_ids=input_ids, output_attentions=True).attentions[1][:, 2]
    torch.testing.assert_close(weights, expected)
    for name, kwargs in (("mask.png", {}), ("weights.png", {"layer": 0, "head": 1})):
        path = visualizer.save_png(tmp_path / name, TEXTS, **kwargs)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _missing_glyph_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if re.search(r"Glyph \d+ .* missing from font", str(w.message))]


def test_png_draws_the_japanese_labels_and_leaves_rcparams_alone(
    visualizer: AttentionMaskVisualizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    # The check sees missing glyphs: matplotlib's default font has no Japanese.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = Figure()
        figure.text(0.5, 0.5, "吾輩は猫", family="DejaVu Sans")
        figure.savefig(io.BytesIO(), format="png")
    assert _missing_glyph_warnings(caught)

    # A first import of matplotlib_fontja (which sets rcParams globally) happens inside save_png.
    monkeypatch.delitem(sys.modules, "matplotlib_fontja", raising=False)
    attention_visualizer.japanese_font_family.cache_clear()
    before = dict(matplotlib.rcParams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        visualizer.save_png(tmp_path / "mask.png", TEXTS)
    assert _missing_glyph_warnings(caught) == []
    assert attention_visualizer.japanese_font_family() == "IPAexGothic"  # from the test extra
    assert dict(matplotlib.rcParams) == before


def test_without_a_japanese_font_warns_once_naming_the_extra(
    visualizer: AttentionMaskVisualizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib_fontja", None)  # importing it raises ImportError
    monkeypatch.setattr(attention_visualizer, "_has_glyphs", lambda font_path, text: False)
    attention_visualizer.japanese_font_family.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in ("a.png", "b.png"):
                assert visualizer.save_png(tmp_path / name, TEXTS[1]).stat().st_size > 0
    finally:
        attention_visualizer.japanese_font_family.cache_clear()
    messages = [str(w.message) for w in caught]  # once, and no warning per missing glyph
    assert len(messages) == 1 and "pip install 'neoxja[viz]'" in messages[0], messages
    assert caught[0].filename == __file__  # it points at the caller of save_png


def test_clear_errors(
    tiny_dir: Path, visualizer: AttentionMaskVisualizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        visualizer("")
    with pytest.raises(ValueError, match="head=4 is out of range"):
        visualizer.attention_weights(TEXTS[0], layer=0, head=4)
    with pytest.raises(ValueError, match="both layer and head"):
        visualizer.save_png("x.png", TEXTS[0], layer=0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"neoxja\[viz\]"):
        visualizer.save_png("x.png", TEXTS[0])


def test_importable_from_both_places() -> None:
    from neoxja.utils.attention_visualizer import AttentionMaskVisualizer as direct

    assert neoxja.AttentionMaskVisualizer is direct


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_png_labels_are_readable_and_inside_the_image(
    visualizer: AttentionMaskVisualizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token labels are drawn big enough for kanji (at least 16 px tall by default; they were 10) and
    the figure is sized so that none is cut off, for a long label and for --dpi/--font-size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn: list[Figure] = []

    class Recorded(Figure):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            drawn.append(self)

    monkeypatch.setattr(attention_visualizer, "_figure_class", lambda: Recorded)
    text = "人とAIが協調するためには、吾輩は猫である。名前はまだ無い。"
    sizes = {}
    for name, kwargs in (("default", {}), ("300dpi", {"dpi": 300}), ("big", {"font_size": 16})):
        path = visualizer.save_png(tmp_path / f"{name}.png", text, **kwargs)
        figure = drawn[-1]
        sizes[name] = _png_size(path)
        dpi = kwargs.get("dpi", attention_visualizer.DEFAULT_DPI)
        width, height = figure.get_size_inches() * dpi
        assert sizes[name] == pytest.approx((width, height), abs=1)
        ax = figure.axes[0]
        labels = [*ax.get_xticklabels(), *ax.get_yticklabels()]
        assert len(labels) == 2 * len(visualizer.mask(text)[0][0])
        figure.dpi = dpi  # measured as the file was drawn
        renderer = FigureCanvasAgg(figure).get_renderer()
        for label in labels:
            box = label.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, label.get_text()
        tallest = max(label.get_window_extent(renderer).height for label in ax.get_yticklabels())
        assert tallest >= kwargs.get("font_size", 10) * dpi / 72 * 0.9
        if not kwargs:
            assert tallest >= 16
    assert min(sizes["default"]) >= 600
    assert sizes["300dpi"][0] == pytest.approx(2 * sizes["default"][0], abs=2)
    assert sizes["big"][0] > sizes["default"][0]  # bigger labels, a bigger figure to hold them
    with pytest.raises(ValueError, match="dpi must be a positive number"):
        visualizer.save_png(tmp_path / "x.png", text, dpi=0)


def test_the_command_line_defaults_are_the_visualizers() -> None:
    # neoxja.commands.visualize repeats them (importing this module would import torch at start-up).
    from neoxja.commands import visualize

    assert (visualize.DEFAULT_DPI, visualize.DEFAULT_FONT_SIZE) == (
        attention_visualizer.DEFAULT_DPI,
        attention_visualizer.DEFAULT_FONT_SIZE,
    )


@pytest.mark.parametrize("spelling", ["--output", "-o", "--png"])
def test_visualize_mask_output_spellings_and_dpi(
    spelling: str, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neoxja.cli import main

    png = tmp_path / "mask.png"
    assert (
        main(["visualize-mask", "--model", str(tiny_dir), spelling, str(png), "--dpi", "72", "猫です"]) == 0
    )
    out, err = capsys.readouterr()
    assert "batch row" not in out and f"wrote {png}" in err and f"wrote {png}" not in out
    assert _png_size(png)[0] == 4 * 72  # the smallest figure, 4 inches, at 72 dpi
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: one line, status 2
        main(["visualize-mask", "--model", str(tiny_dir), "--dpi", "0", "-o", str(png), "猫"])
    assert exit_info.value.code == 2 and "argument --dpi: must be > 0" in capsys.readouterr().err
