"""Labelled pictures: input | reconstruction grids, error maps with their scale, caption bands, for previews,
reconstructions.png, eval grids and probe figures."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .images import to_uint8


def label_font(size: int = 11):
    """Pillow's default font at `size` px (a fixed-size bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()



def fit_text(text: str, width: float, font) -> str:
    """`text` cut (ending '..') to at most `width` px in `font`."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "..") > width:
        text = text[:-1]
    return text.rstrip() + ".."



def caption(texts, width: float, font) -> str:
    """The first of `texts` (longest first) that fits in `width` px, else the last one cut to fit."""
    return next((t for t in texts if font.getlength(t) <= width), None) or fit_text(texts[-1], width, font)



def wrap(text: str, width: float, font) -> list[str]:
    """`text` in lines at most `width` px wide: broken at spaces, a word too long for a line cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [fit_text(line, width, font) for line in lines] or [""]



def line_height(font) -> int:
    return font.getbbox("Ag|")[3] + 2



def label_band(labels, width: int, font=None) -> Image.Image:
    """A white band `width` px wide with each (x, w, text) of `labels` wrapped into the w px from x on, as tall
    as the longest text needs."""
    font = font or label_font()
    lines = [wrap(text, w - 4, font) for _, w, text in labels]
    step = line_height(font)
    band = Image.new("RGB", (width, 4 + step * max((len(ls) for ls in lines), default=1)), "white")
    draw = ImageDraw.Draw(band)
    for (x, _, _), ls in zip(labels, lines):
        for k, line in enumerate(ls):
            draw.text((x + 2, 2 + k * step), line, fill="black", font=font)
    return band



def stack(*pictures: Image.Image) -> Image.Image:
    """Pictures one below the other, left-aligned, on white."""
    figure = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for p in pictures:
        figure.paste(p.convert("RGB"), (0, y))
        y += p.height
    return figure



def colour_legend(width: int, cmap: str, font, text: str, height: int = 10) -> Image.Image:
    """A colour bar from the colour for 0 (left) to full colour (right), `text` saying what they mean, below it."""
    bar = (colormaps[cmap](np.linspace(0, 1, width))[None, :, :3].repeat(height, 0) * 255).astype(np.uint8)
    space = Image.new("RGB", (width, 4), "white")
    return stack(space, Image.fromarray(bar), label_band([(0, width, text)], width, font))



def comparison_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, columns: int = 4) -> Image.Image:
    """Pairs (input | reconstruction) laid out `columns` pairs per row, the columns labelled above."""
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    pairs = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]
    columns = min(columns, len(pairs))
    while len(pairs) % columns:
        pairs.append(np.full_like(pairs[0], 255))
    rows = [np.concatenate(pairs[i:i + columns], axis=1) for i in range(0, len(pairs), columns)]
    w, font = a.shape[2], label_font()
    output = caption(("reconstruction", "recon.", "rec"), w - 4, font)
    labels = [(k * w, w, output if k % 2 else "input") for k in range(2 * columns)]
    return stack(label_band(labels, 2 * columns * w), Image.fromarray(np.concatenate(rows, axis=0)))



def error_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, min_side: int = 384,
               gain: float = 4.0) -> Image.Image:
    """One row per image: input | reconstruction | error (mean |difference| over the channels, x `gain`, as a
    heat map). Small images are enlarged by an integer factor (nearest) to at least `min_side`, so detail shows."""
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    error = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=-1) / 255 * gain
    heat = (colormaps["inferno"](np.clip(error, 0, 1))[..., :3] * 255).astype(np.uint8)
    zoom = max(1, -(-min_side // max(a.shape[1], a.shape[2])))
    gap = np.full((a.shape[1] * zoom, 4, 3), 255, np.uint8)
    rows = []
    for panels in zip(a, b, heat):
        large = [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in panels]
        rows += [np.concatenate([large[0], gap, large[1], gap, large[2]], axis=1),
                 np.full((4, 3 * a.shape[2] * zoom + 8, 3), 255, np.uint8)]
    return Image.fromarray(np.concatenate(rows[:-1], axis=0))



def error_figure(inputs: torch.Tensor, reconstructions: torch.Tensor, min_side: int = 384,
                 gain: float = 4.0) -> Image.Image:
    """error_grid with its columns labelled above and the heat map's scale below (reconstructions.png)."""
    grid = error_grid(inputs, reconstructions, min_side, gain)
    side = (grid.width - 8) // 3
    titles = ("input", "reconstruction", "error |reconstruction - input|")
    font = label_font(max(11, min(16, side // 24)))
    band = label_band([(k * (side + 4), side, t) for k, t in enumerate(titles)], grid.width, font)
    legend = colour_legend(side, "inferno", font, f"error heat map: black 0, full colour {1 / gain:.3g} or more (mean "
                                            f"|difference| over RGB, pixels on [0, 1]; {255 / gain:.0f} of 255 levels)")
    corner = Image.new("RGB", (grid.width, legend.height), "white")
    corner.paste(legend, (2 * (side + 4), 0))
    return stack(band, grid, corner)
