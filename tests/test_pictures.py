"""The pictures the commands write explain themselves: columns labelled, scales stated, no caption cut."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.pictures import comparison_grid, error_figure, error_grid, label_band, label_font, wrap
from sdvae.images import to_uint8

WHITE = 255


def images(n=2, side=32, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ink_columns(band: np.ndarray) -> np.ndarray:
    """x of every column of `band` (H, W, 3) with a non-white pixel."""
    return np.flatnonzero((band < WHITE).any(axis=(0, 2)))


def assert_inside(band: np.ndarray, columns) -> None:
    """Each label's ink lies within its own column (x, w): the last 2 pixels of each column are background."""
    ink = set(ink_columns(band))
    for x, w in columns:
        assert any(x <= i < x + w for i in ink)  # the label is drawn
        assert not ink & {x + w - 2, x + w - 1}  # and not cut at, or running over, the column's right edge


def test_wrap_fits_every_line_and_cuts_a_word_too_long():
    font = label_font()
    lines = wrap("error heat map: black 0, full colour 0.25 or more supercalifragilisticexpialidocious", 60, font)
    assert len(lines) > 2 and all(font.getlength(line) <= 60 for line in lines)
    assert lines[-1].endswith("..")
    band = np.asarray(label_band([(0, 60, "supercalifragilisticexpialidocious")], 200))
    assert ink_columns(band).max() < 60


def test_preview_grid_labels_input_and_reconstruction_columns():
    x, y = images(3), images(3, seed=1)
    grid = np.asarray(comparison_grid(x, y, columns=2))
    band = grid.shape[0] - 2 * 32  # 3 pairs in rows of 2: two rows of 32 px under the label band
    assert grid.shape[1] == 4 * 32 and 10 <= band <= 30
    assert (grid[band:band + 32, :32] == to_uint8(x)[0]).all() and (grid[band:band + 32, 32:64] == to_uint8(y)[0]).all()
    assert_inside(grid[:band], [(k * 32, 32) for k in range(4)])


def test_reconstructions_png_labels_its_columns_and_states_the_error_scale():
    x, y = images(), images(seed=1)
    grid = np.asarray(error_grid(x, y, min_side=128))
    figure = np.asarray(error_figure(x, y, min_side=128))
    band = next(b for b in range(60) if (figure[b:b + grid.shape[0]] == grid).all())  # the panels, unchanged,
    assert band >= 10  # under the labels
    assert_inside(figure[:band], [(0, 128), (132, 128), (264, 128)])
    legend = figure[band + grid.shape[0]:]
    assert legend.shape[0] > 20 and figure.shape[1] == grid.shape[1]
    assert (legend[:, :264] == WHITE).all()  # under the error column only
    bar = legend[(legend[:, 264:] != WHITE).all(axis=(1, 2))][0, 264:]  # the first row that is colour throughout
    assert bar[0].sum() < 30 and bar[-1].sum() > 500  # black for 0 ... pale yellow for full colour
    below = legend[np.flatnonzero((legend[:, 264:] != WHITE).all(axis=(1, 2)))[-1] + 1:]
    assert (below < WHITE).sum() > 100 and (below[-1] == WHITE).all()  # text under the bar, not cut off


def test_reconstructions_legend_states_what_full_colour_is(monkeypatch):
    import sdvae.pictures as pictures

    said = []
    monkeypatch.setattr(pictures, "label_band", lambda labels, *a, **k: said.extend(t for *_, t in labels) or
                        Image.new("RGB", (8, 8), "white"))
    error_figure(images(), images(seed=1), min_side=64, gain=4.0)
    assert "input" in said and "reconstruction" in said
    assert any("0.25" in t and "64 of 255" in t for t in said)  # what the heat map's full colour is, x4 gain


def eval_figure(side, vaes=("sd-vae-ft-mse", "flux")):
    from sdvae.evaluate import comparison_figure

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    recs = {v: np.clip(image + rng.integers(-9, 9, image.shape), 0, 255).astype(np.uint8) for v in vaes}
    values = {v: {"psnr": [31.234], "ssim": [0.91234]} for v in vaes}
    name = "a_photo_with_a_rather_long_name.png"
    return np.asarray(comparison_figure([(name, image, recs)], list(vaes), values, [name]))


@pytest.mark.parametrize("side", [64, 128])
def test_eval_grid_captions_fit_their_tiles(side):
    figure = eval_figure(side)
    label, gap = 18, 4
    assert figure.shape == (3 * (side + label) + gap, 3 * (side + gap) - gap, 3)
    for row in range(3):
        band = figure[row * (side + label):row * (side + label) + label]
        assert_inside(band, [(c * (side + gap), side) for c in range(3)])
        for c in range(2):  # the white gaps between tiles stay white: no caption runs into the next tile
            assert (band[:, c * (side + gap) + side:(c + 1) * (side + gap)] == WHITE).all()


def test_eval_grid_keeps_the_scores_when_it_shortens_a_caption(monkeypatch):
    from PIL import ImageDraw

    drawn = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k:
                        drawn.append(text) or original(self, xy, text, *a, **k))
    eval_figure(128)
    assert any("31.2" in t and "sd-vae-ft-mse" in t for t in drawn) and any("0.912" in t for t in drawn)


def test_psnr_plot_title_fits_the_figure():
    from sdvae.evaluate import psnr_plot

    values = {"stabilityai-sd-vae-ft-mse-original": {"psnr": [28.0, 29.5, 30.1]}}
    result = {"protocol": {"full_size": False, "resolution": 128}, "images": 3,
              "data": "/data/my_long_dataset_name/validation_images_2017"}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = psnr_plot(values, result)
    renderer = FigureCanvasAgg(fig).get_renderer()
    box, page = fig._suptitle.get_window_extent(renderer), fig.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1


def test_equivariance_rows_label_every_column():
    from sdvae.probe_report import equivariance_labels, equivariance_row

    x = images(2, 64)
    encode = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731
    decode = lambda z: torch.nn.functional.interpolate(z, scale_factor=8)  # noqa: E731
    row = np.asarray(equivariance_row(encode, decode, x))
    labels = equivariance_labels()
    assert len(labels) == 5
    widths = [64, 32, 32, 64, 64] * 2  # x | x/2, D(z/2) | rot x, D(rot z), per image
    band = row.shape[0] - 64
    assert 10 <= band <= 30 and row.shape[1] == sum(widths) + 4 * (len(widths) - 1)
    starts = np.cumsum([0] + [w + 4 for w in widths[:-1]])
    assert_inside(row[:band], [(int(s), 64) for s, w in zip(starts, widths) if w == 64])  # narrow ones may be cut
    assert all((row[:band, s:s + w] < WHITE).any() for s, w in zip(starts, widths))


def test_probe_pictures_have_a_title_names_and_numbered_sample_columns():
    from sdvae.probe_report import EXPLAINED, image_row, labelled_rows

    tiles = list(to_uint8(images(4, 32)))
    rows = {"vae-a": image_row(tiles), "vae-b": image_row(tiles)}
    plain = np.asarray(labelled_rows(rows))
    titled = np.asarray(labelled_rows(rows, EXPLAINED["samples"]))
    assert titled.shape[1] == plain.shape[1] == 4 * 32 + 3 * 4 and titled.shape[0] > plain.shape[0] + 20
    assert (plain[-32:] == np.asarray(rows["vae-b"])).all()
    assert_inside(plain[-32 - 16:-32], [(k * 36, 32) for k in range(4)])  # "1" .. "4" above the tiles
