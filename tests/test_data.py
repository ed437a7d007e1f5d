import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.data import ImageFolder, build_dataset, collate
from sdvae.images import open_image
from sdvae.images import load_photo


def real_photo(size=(80, 60)):
    return Image.fromarray(load_photo("astronaut")).resize(size)


def write_real_world_files(folder):
    """Files as they come from scrapes and phones. Returns (good names, bad names)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = real_photo()
    photo.convert("L").save(folder / "grey.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must become white, not black
    rgba.save(folder / "transparent.png")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((60, 80), 32768, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    photo.save(folder / "rotated.jpg", exif=exif)
    photo.resize((10, 7)).save(folder / "tiny.png")
    photo.save(folder / "photo.webp")
    (folder / "sub").mkdir()
    photo.save(folder / "sub" / "nested.bmp")
    good = ["grey.png", "transparent.png", "palette.png", "cmyk.jpg", "sixteen_bit.png", "rotated.jpg",
            "tiny.png", "photo.webp", "nested.bmp"]

    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("<html>404 not found</html>")
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "notes.txt").write_text("ignored: not an image extension")
    bad = ["truncated.jpg", "empty.png", "not_an_image.jpg", "random.png"]
    return good, bad


def test_real_world_files_convert_or_are_skipped(tmp_path):
    good, bad = write_real_world_files(tmp_path / "mixed")
    dataset = ImageFolder(tmp_path / "mixed", resolution=32)
    assert len(dataset) == len(good) + len(bad)
    items = {f.name: dataset[i] for i, f in enumerate(dataset.files)}
    for name in good:
        x = items[name]["pixel_values"]
        assert x is not None, items[name]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    for name in bad:
        assert items[name]["pixel_values"] is None and items[name]["error"]
    assert items["transparent.png"]["pixel_values"].min() == 1.0  # composited on white
    sixteen = items["sixteen_bit.png"]["pixel_values"]
    assert abs(float(sixteen.mean())) < 0.01  # 32768/65535 is mid-grey, not clipped to white
    grey = items["grey.png"]["pixel_values"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])

    batch = collate([items[n] for n in ("grey.png", "empty.png", "cmyk.jpg")])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert [name for name, _ in batch["skipped"]] == [str(tmp_path / "mixed" / "empty.png")]


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    real_photo((40, 20)).save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_crops_depend_on_seed_epoch_and_index_only(photos):
    a = ImageFolder(photos, resolution=32, seed=1)
    b = ImageFolder(photos, resolution=32, seed=1)
    assert torch.equal(a[2]["pixel_values"], b[2]["pixel_values"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["pixel_values"], b[2]["pixel_values"])
    centre = ImageFolder(photos, resolution=32, random_crop=False, random_flip=False)
    centre.set_epoch(5)
    assert torch.equal(centre[0]["pixel_values"], ImageFolder(photos, 32, False, False)[0]["pixel_values"])


def test_kept_decoded_images_give_the_same_crops_without_reading_the_files_again(photos):
    from sdvae.data import DecodedImages

    plain, kept = ImageFolder(photos, 32, seed=3), ImageFolder(photos, 32, seed=3)
    kept.keep_decoded(64)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        kept.set_epoch(epoch)
        assert all(torch.equal(plain[i]["pixel_values"], kept[i]["pixel_values"]) for i in range(len(plain)))
    for f in photos.iterdir():
        f.unlink()
    kept.set_epoch(2)
    assert all(kept[i]["pixel_values"] is not None for i in range(len(kept)))  # decoded once, cropped since
    assert plain[0]["pixel_values"] is None and "FileNotFoundError" in plain[0]["error"]
    budget = DecodedImages(1)  # MiB
    budget.add(0, Image.new("RGB", (600, 600)))  # 1.03 MiB: over the budget, decoded again each time
    budget.add(1, Image.new("RGB", (500, 500)))
    assert list(budget.images) == [1]


def test_zoomed_out_crops_hold_more_of_the_scene_and_stay_reproducible():
    from sdvae.data import ImageTransform

    ramp = np.tile(np.linspace(0, 255, 1024), (600, 1)).astype(np.uint8)  # brightness = column
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    native, wide = ImageTransform(128, random_flip=False), ImageTransform(128, random_flip=False)
    wide.downscale_max = 4.0

    def spans(transform):
        return [float(x.max() - x.min()) for x in (transform(image, i)[0] for i in range(32))]

    assert max(spans(native)) < 0.26  # 128 of 1024 columns: an eighth of the [-1, 1] range
    assert min(spans(wide)) > 0.23 and max(spans(wide)) > 0.8  # up to 512 columns, shrunk to 128
    assert torch.equal(wide(image, 5), wide(image, 5)) and wide(image, 5).shape == (3, 128, 128)
    small = image.crop((0, 0, 100, 100))
    assert wide(small, 0).shape == (3, 128, 128)  # smaller than the crop: upscaled as before


def test_empty_and_missing_data_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images in"):
        build_dataset(str(tmp_path / "empty"), 32)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_dataset(str(tmp_path / "missing"), 32)


def test_hugging_face_dataset_from_disk(tmp_path):
    import datasets

    images = [real_photo((48, 40)), real_photo((40, 48)).convert("L")]
    ds = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    dataset = build_dataset(str(tmp_path / "ds"), 32, image_column="img")
    assert len(dataset) == 2 and dataset[1]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="columns"):
        build_dataset(str(tmp_path / "ds"), 32, image_column="image")
    streamed = build_dataset(str(tmp_path / "ds"), 32, image_column="img", streaming=True)
    assert [item["pixel_values"].shape for item in streamed] == [(3, 32, 32)] * 2


def test_colour_keyed_transparency_is_composited_on_white(tmp_path):
    """PNG's tRNS on greyscale / RGB images (no alpha channel): the keyed colour is transparent, as with RGBA."""
    photo = np.array(real_photo((16, 8)))
    photo[:4] = (10, 20, 30)
    Image.fromarray(photo).save(tmp_path / "keyed.png", transparency=(10, 20, 30))
    rgb = np.array(open_image(tmp_path / "keyed.png"))
    assert (rgb[:4] == 255).all() and np.array_equal(rgb[4:], photo[4:])
    grey = np.array(real_photo((16, 8)).convert("L"))
    grey[:4] = 0
    Image.fromarray(grey).save(tmp_path / "keyed_grey.png", transparency=0)
    assert (np.array(open_image(tmp_path / "keyed_grey.png"))[:4] == 255).all()
