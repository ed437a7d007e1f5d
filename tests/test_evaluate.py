"""`sdvae eval`: metrics against their reference implementations, and the command end to end (offline, CPU)."""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import linalg, stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sdvae.cli import main
from sdvae.images import open_image
from sdvae.images import load_photo
from sdvae.evaluate import batches, load_scorers, paired_difference, parse_vae_specs
from sdvae.downloads import FID_WEIGHTS_URL
from sdvae.metrics import feature_statistics, fid_from_features, frechet_distance, psnr_batch, ssim_batch
from sdvae.models import build_vae

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def degraded(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """JPEG artefacts plus noise: a realistic, imperfect reconstruction."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=30)
    out = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64)
    out += np.random.default_rng(seed).normal(0, 4, out.shape)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def check_against_skimage(images):
    for a in images:
        a = np.ascontiguousarray(a[:240, :320])  # a real region, small enough for a fast reference
        b = degraded(a)
        ours_psnr, ours_ssim = psnr_batch(a[None], b[None]).item(), ssim_batch(a[None], b[None]).item()
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=255)
        ref_ssim = structural_similarity(a / 255.0, b / 255.0, channel_axis=-1, data_range=1.0,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(ours_psnr - ref_psnr) < 1e-4 and abs(ours_ssim - ref_ssim) < 1e-4, (ours_psnr, ref_psnr,
                                                                                         ours_ssim, ref_ssim)
        assert 0.2 < ours_ssim < 0.99 and 15 < ours_psnr < 40  # a real difference was measured


def test_psnr_ssim_match_scikit_image_on_photos():
    check_against_skimage([load_photo(name) for name in ("astronaut", "coffee", "camera", "motorcycle")])


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real image sets not found at {SHARED} (../shared/data)")
def test_psnr_ssim_match_scikit_image_on_benchmark_sets():
    files = [SHARED / "kodak" / "kodim04.png", SHARED / "kodak" / "kodim23.png", SHARED / "set14" / "bridge.png",
             SHARED / "set14" / "comic.png"]  # portrait, landscape, greyscale, drawing
    check_against_skimage([np.asarray(open_image(f)) for f in files if f.is_file()])


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside pytorch-fid
def test_frechet_distance_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24))
    b = 0.8 * rng.normal(size=(150, 24)) @ rng.normal(size=(24, 24)) + 0.3
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    # the symmetric form: Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2)
    r1 = linalg.sqrtm(s1).real
    direct = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(direct, rel=1e-6) and ours > 1
    from pytorch_fid.fid_score import calculate_frechet_distance

    assert ours == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-9)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-6 * np.trace(s1)
    few = rng.normal(size=(10, 64))  # fewer samples than dimensions: singular covariances
    assert abs(frechet_distance(*feature_statistics(few), *feature_statistics(few))) < 1e-3 * np.trace(np.cov(few.T))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(few[:1])


@pytest.mark.parametrize("n", [5, 40, 80])  # 80: more images than dimensions, no reduction
def test_fid_of_few_images_is_computed_in_their_span_with_the_same_value(n):
    rng = np.random.default_rng(n)
    real, fake = rng.normal(size=(n, 128)), 0.9 * rng.normal(size=(n + 3, 128)) + 0.1
    full = frechet_distance(*feature_statistics(real), *feature_statistics(fake))  # in all 128 dimensions
    assert fid_from_features(real, fake) == pytest.approx(full, rel=1e-6)
    assert abs(fid_from_features(real, real)) < 1e-6 * full


def test_paired_difference_interval_is_scipys():
    rng = np.random.default_rng(1)
    a = rng.normal(25, 3, 30)
    b = a + rng.normal(0.4, 0.5, 30)
    d = paired_difference(a.tolist(), b.tolist(), "A", "B", "psnr")
    ci = stats.ttest_rel(b, a).confidence_interval(0.95)
    assert d["mean_difference"] == pytest.approx(np.mean(b - a))
    assert d["ci95"] == pytest.approx([ci.low, ci.high]) and d["images"] == 30


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-init trunks written in torchvision's format and under the real file names, and a random FID
    Inception in pytorch-fid's format (torchvision's Inception3 with 1008 classes has the same keys)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    trunks = {"vgg": torchvision.models.vgg16().features, "alex": torchvision.models.alexnet().features}
    names = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
    for net, features in trunks.items():
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, folder / names[net])
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    torch.save(inception.state_dict(), folder / Path(FID_WEIGHTS_URL).name)
    return folder, trunks


@pytest.mark.slow
def test_lpips_matches_the_lpips_package(weights):
    import lpips

    folder, trunks = weights
    models, inception, skipped = load_scorers([str(folder)], None, True, False, False, "cpu")
    assert set(models) == {"lpips_vgg", "lpips_alex"} and skipped == {"rfid": "turned off (--no-fid)"}
    x = torch.stack([torch.from_numpy(load_photo(n)[:96, :128]) for n in ("astronaut", "coffee")]).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.stack([degraded(a) for a in x.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    x, y = x.float() / 127.5 - 1, y.float() / 127.5 - 1
    for net, features in trunks.items():
        reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        for piece in reference.net.children():  # lpips' slices name each layer by its torchvision index
            for index, layer in piece.named_children():
                layer.load_state_dict(features[int(index)].state_dict())
        with torch.no_grad():
            expected = reference(y, x).flatten()
            ours = models[f"lpips_{net}"](y, x).flatten()
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
        assert expected.min() > 0


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vaes")
    for seed in (0, 1):
        torch.manual_seed(seed)
        build_vae("tiny").save_pretrained(folder / f"vae{seed}")
    return folder


@pytest.fixture
def mixed_folder(tmp_path):
    """Photos of several sizes and orientations, a greyscale and an RGBA image, a subfolder, a broken file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(load_photo("astronaut")).resize((72, 56)).save(folder / "astronaut.png")
    Image.fromarray(load_photo("chelsea")).resize((48, 80)).save(folder / "sub" / "chelsea.jpg")
    Image.fromarray(load_photo("coffee")).resize((72, 56)).save(folder / "coffee.png")
    Image.fromarray(load_photo("camera")[..., 0]).resize((64, 64)).save(folder / "grey.png")
    rgba = Image.fromarray(load_photo("rocket")).resize((40, 64)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_full_size_batches_hold_one_size_and_not_the_whole_set(tmp_path):
    photo = Image.fromarray(load_photo("coffee"))
    for k in range(12):  # 12 sizes: no size ever fills a batch of 2
        photo.resize((16 + k, 20)).save(tmp_path / f"{k:02d}.png")
    read = []

    def files():
        for path in sorted(tmp_path.glob("*.png")):
            read.append(path)
            yield path.name, path

    out = batches(files(), 0, True, 2, None, [])
    names, arrays = next(out)
    assert len(read) <= 9 and arrays.shape == (1, 20, 16, 3)  # flushed after 4 batches' worth, not at the end
    names += [n for more, _ in out for n in more]
    assert sorted(names) == [f"{k:02d}.png" for k in range(12)]


@pytest.mark.slow
def test_eval_compares_vaes_on_mixed_images(vaes, weights, mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--vae", f"a={vaes / 'vae0'}", "--vae", f"b={vaes / 'vae1'}", "--vae", f"a-again={vaes / 'vae0'}",
               "--data", str(mixed_folder), "--out", str(out), "--full-size", "--batch-size", "2",
               "--lpips-weights", str(weights[0]), "--no-fid", "--no-download", "--grid-images", "3"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert result["images"] == 5 and [f["path"] for f in result["skipped_files"]] == [str(mixed_folder / "broken.png")]
    assert set(result["vaes"]) == {"a", "b", "a-again"} and result["skipped_metrics"] == {"rfid": "turned off (--no-fid)"}
    a, b, again = (result["vaes"][v] for v in ("a", "b", "a-again"))
    for m in ("psnr", "ssim", "lpips_vgg", "lpips_alex"):
        assert np.isfinite(a[f"{m}_mean"]) and a[f"{m}_mean"] == again[f"{m}_mean"] != b[f"{m}_mean"]
    same = [d for d in result["paired"] if d["b"] == "a-again" and d["a"] == "a"]
    assert len(same) == 4 and all(d["mean_difference"] == 0 for d in same)
    assert len(result["paired"]) == 3 * 4  # every pair of VAEs, every per-image metric

    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 3
    sizes = {(r["image"], r["width"], r["height"]) for r in rows}
    assert ("sub/chelsea.jpg", "48", "80") in sizes and ("grey.png", "64", "64") in sizes
    # one row checked against scikit-image on the VAE's own reconstruction, done independently
    import sdvae

    codec = sdvae.load_vae(str(vaes / "vae1"))
    image = np.asarray(open_image(mixed_folder / "rgba.png"))
    rec = codec.decode(codec.encode(image, scaled=False), size=(40, 64), scaled=False, output_type="np")[0]
    row = next(r for r in rows if r["image"] == "rgba.png" and r["vae"] == "b")
    assert float(row["psnr"]) == pytest.approx(peak_signal_noise_ratio(image, rec, data_range=255), abs=1e-4)

    table = (out / "table.md").read_text()
    assert "| a |" in table and "| b |" in table and "LPIPS-Alex" in table and "rFID: turned off" in table
    grid, plot = Image.open(out / "grid.png"), Image.open(out / "psnr.png")
    # 3 images (spread over the 5) x 3 rows (full | crop | error), tiles fit the largest: 72 wide, 80 high
    assert grid.size == (4 * 72 + 3 * 4, 3 * (3 * (80 + 18) + 4)) and plot.width > 200
    assert "| a |" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_at_a_resolution_with_rfid_and_sampling(vaes, weights, mixed_folder, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--vae", str(vaes / "vae0"), "--data", str(mixed_folder), "--out", str(out), "--resolution",
            "32", "--no-lpips", "--fid-weights", str(weights[0]), "--no-download", "--max-images", "4"]
    assert main(args + ["--sample", "--seed", "3"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["images"] == 4 and result["protocol"]["resolution"] == 32 and result["protocol"]["sample"]
    vae = result["vaes"]["vae0"]
    assert np.isfinite(vae["rfid"]) and vae["rfid"] > 0 and "statistically weak" in result["notes"][0]
    assert set(result["skipped_metrics"]) == {"lpips_vgg", "lpips_alex"}
    with open(out / "per_image.csv") as f:
        assert {r["width"] + "x" + r["height"] for r in csv.DictReader(f)} == {"32x32"}
    sampled = vae["psnr_mean"]
    assert main(args + ["--sample", "--seed", "3"]) == 0  # seeded: the same samples again
    assert json.loads((out / "metrics.json").read_text())["vaes"]["vae0"]["psnr_mean"] == sampled
    assert main(args + ["--no-fid"]) == 0
    assert json.loads((out / "metrics.json").read_text())["vaes"]["vae0"]["psnr_mean"] != sampled  # the mode


def test_missing_weights_skip_those_metrics_and_say_why(vaes, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "out"
    assert main(["eval", "--vae", str(vaes / "vae0"), "--data", str(photos), "--out", str(out),
                 "--resolution", "64", "--max-images", "2", "--no-download"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    cache = str(tmp_path / "torch" / "hub" / "checkpoints")
    reasons = result["skipped_metrics"]
    assert set(reasons) == {"lpips_vgg", "lpips_alex", "rfid"}
    assert "vgg16-397923af.pth" in reasons["lpips_vgg"] and cache in reasons["lpips_vgg"]
    assert "alexnet-owt-7be5be79.pth" in reasons["lpips_alex"] and "--no-lpips" in reasons["lpips_alex"]
    assert "pt_inception-2015-12-05-6726825d.pth" in reasons["rfid"] and cache in reasons["rfid"]
    assert np.isfinite(result["vaes"]["vae0"]["psnr_mean"]) and result["images"] == 2
    table = (out / "table.md").read_text()
    assert "skipped" in table and "pt_inception-2015-12-05-6726825d.pth" in table


def test_clear_errors(vaes, photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    base = ["eval", "--vae", str(vaes / "vae0"), "--out", str(tmp_path / "out"), "--no-lpips", "--no-fid"]
    assert main(base + ["--data", str(tmp_path / "empty")]) == 2
    assert "no images in" in capsys.readouterr().err
    assert main(base + ["--data", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--vae", f"x={tmp_path / 'nope'}", "--data", str(photos), "--out", str(tmp_path / "o"),
                 "--no-lpips", "--no-fid"]) == 2
    assert "--vae x" in capsys.readouterr().err
    assert main(base + ["--data", str(photos), "--batch-size", "0"]) == 2
    with pytest.raises(ValueError, match="two VAEs are called"):
        parse_vae_specs(["m=a", "m=b"])
    assert parse_vae_specs(["runs/demo/", "ft=some/file.safetensors"]) == {"demo": "runs/demo/",
                                                                          "ft": "some/file.safetensors"}


def test_a_vae_as_a_diffusers_folder_a_single_file_or_a_run_folder_scores_the_same(vaes, photos, tmp_path):
    from diffusers import AutoencoderKL

    from sdvae.export import save_single_file

    vae = AutoencoderKL.from_pretrained(vaes / "vae1")
    single = save_single_file(vae, tmp_path / "vae1.safetensors")
    run = tmp_path / "run"
    vae.save_pretrained(run / "vae")  # a training run folder keeps its export in vae/
    out = tmp_path / "out"
    assert main(["eval", "--vae", f"folder={vaes / 'vae1'}", "--vae", str(single), "--vae", str(run),
                 "--vae", f"other={vaes / 'vae0'}", "--data", str(photos), "--out", str(out),
                 "--resolution", "48", "--no-lpips", "--no-fid", "--grid-images", "0"]) == 0
    scores = {name: (v["psnr_mean"], v["ssim_mean"]) for name, v in json.loads((out / "metrics.json").read_text())["vaes"].items()}
    assert set(scores) == {"folder", "vae1", "run", "other"}
    assert scores["vae1"] == pytest.approx(scores["folder"], abs=1e-6) and scores["run"] == scores["folder"]
    assert scores["other"] != scores["folder"]


def test_a_datasets_dataset_scores_as_the_same_images_in_a_folder(vaes, mixed_folder, tmp_path):
    import datasets

    files = sorted(p for p in mixed_folder.rglob("*.*") if p.name != "broken.png")
    rows = {"image": [str(p) for p in files] + [str(mixed_folder / "broken.png")], "label": list(range(len(files) + 1))}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    base = ["--vae", str(vaes / "vae0"), "--resolution", "40", "--no-lpips", "--no-fid", "--grid-images", "2"]
    assert main(["eval", "--data", str(mixed_folder), "--out", str(tmp_path / "a")] + base) == 0
    assert main(["eval", "--data", str(tmp_path / "saved"), "--out", str(tmp_path / "b")] + base) == 0
    a, b = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in "ab")
    assert a["images"] == b["images"] == len(files) and len(b["skipped_files"]) == 1  # the broken one, counted
    assert b["skipped_files"][0]["path"] == f"image[{len(files)}]"
    assert b["vaes"]["vae0"]["psnr_mean"] == pytest.approx(a["vaes"]["vae0"]["psnr_mean"], abs=1e-9)
    assert (tmp_path / "b" / "grid.png").is_file()
    assert main(["eval", "--data", str(tmp_path / "saved"), "--split", "train", "--out", str(tmp_path / "c")] + base) == 2
    assert main(["eval", "--data", str(tmp_path / "saved"), "--image-column", "picture",
                 "--out", str(tmp_path / "c")] + base) == 2
