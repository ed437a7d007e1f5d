"""sdvae probe: each measure ranks known cases correctly, the probe is deterministic and fair between VAEs."""
import json

import pytest
import torch
import torch.nn.functional as F

from sdvae import denoiser as dn
from sdvae.cli import main
from sdvae.diagnostics import equivariance, high_frequency_fraction, posterior_moments, noise_robustness
from sdvae.models import build_vae
from sdvae.presets import preset_config
from sdvae.probe import ProbeSettings, probe, train_probe
from tests.conftest import write_photos


def smooth_field(n, channels, size, seed=0):
    """Unit-variance fields with structure: 4x4 noise upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    z = F.interpolate(torch.randn(n, channels, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    return (z - z.mean()) / z.std()


def test_spectrum_of_white_noise_and_smooth_fields():
    g = torch.Generator().manual_seed(0)
    assert high_frequency_fraction(torch.randn(64, 4, 16, 16, generator=g)) == pytest.approx(0.75, abs=0.03)
    assert high_frequency_fraction(torch.randn(16, 4, 32, 32, generator=g)) == pytest.approx(0.75, abs=0.02)
    assert high_frequency_fraction(smooth_field(16, 4, 16)) < 0.01
    # ranks in between: half noise, half smooth lies between the two
    mixed = high_frequency_fraction(smooth_field(64, 4, 16) + torch.randn(64, 4, 16, 16, generator=g))
    assert 0.2 < mixed < 0.6


def test_latent_statistics_are_exact_moments_of_the_posterior():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.0, 0.5]).view(1, 4, 1, 1) + 3
    std = torch.full_like(mean, 0.5)
    std[:, 2] = 1.0
    stats = posterior_moments(mean, torch.where(torch.arange(4).view(1, 4, 1, 1) == 2, 1.0, std))
    draws = mean + std * torch.randn(mean.shape, generator=g)
    assert stats["std"] == pytest.approx(float(draws.std()), rel=0.02)
    assert stats["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert stats["shift_factor"] == pytest.approx(3.0, abs=0.05)
    # channel 2 is N(3, 1) everywhere: its KL is exactly 0.5 * 3^2, and channels with signal use more
    assert stats["kl_per_channel"][2] == pytest.approx(4.5, rel=1e-6)
    assert stats["channels_in_use"] == 4
    unused = posterior_moments(torch.zeros(10, 4, 4, 4), torch.ones(10, 4, 4, 4))
    assert unused["channels_in_use"] == 0 and max(unused["kl_per_channel"]) == 0


class PoolingAutoencoder:
    """8x average pooling and nearest upsampling: it commutes with 2x pooling and 90-degree rotation."""

    def __init__(self, twist=False):
        self.twist = twist  # a latent-space ramp, undone by the decoder: a good reconstruction, not equivariant

    def ramp(self, z):
        return torch.linspace(-2, 2, z.shape[-1]).view(1, 1, 1, -1).expand_as(z)

    def encode(self, x):
        z = F.avg_pool2d(x, 8)
        return z + self.ramp(z) if self.twist else z

    def decode(self, z):
        z = z - self.ramp(z) if self.twist else z
        return F.interpolate(z, scale_factor=8, mode="nearest")


def test_equivariance_of_an_equivariant_autoencoder_is_at_the_ceiling(photos):
    from sdvae.evaluate import batches, image_sources
    from sdvae.images import pixels_to_tensor

    _, sources = image_sources(str(photos))
    x = pixels_to_tensor(next(batches(sources, 64, False, 8, None, [])) [1])
    exact = equivariance(PoolingAutoencoder().encode, PoolingAutoencoder().decode, x)
    for name, measure in exact.items():
        assert max(abs(g) for g in measure["gap"]) < 0.05, name
        assert min(measure["psnr"]) > 10
    twisted = PoolingAutoencoder(twist=True)
    bent = equivariance(twisted.encode, twisted.decode, x)
    assert bent["rotate_90"]["ceiling"] == pytest.approx(exact["rotate_90"]["ceiling"], abs=1e-6)  # same quality
    assert min(bent["rotate_90"]["gap"]) > 5  # but rotating its latents breaks the image


def test_noise_robustness_falls_with_sigma_and_is_seeded(photos):
    from sdvae.evaluate import batches, image_sources
    from sdvae.images import pixels_to_tensor

    _, sources = image_sources(str(photos))
    x = pixels_to_tensor(next(batches(sources, 64, False, 8, None, []))[1])
    ae = PoolingAutoencoder()
    z = ae.encode(x)
    first = noise_robustness(ae.decode, x, z, scale=1 / float(z.std()), indices=list(range(len(x))))
    again = noise_robustness(ae.decode, x, z, scale=1 / float(z.std()), indices=list(range(len(x))))
    assert first == again
    means = [sum(v) / len(v) for v in first.values()]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 2


def probe_settings(**changes):
    return ProbeSettings(**{**dict(resolution=64, steps=12, batch_size=8, samples=4, sample_steps=4, val_images=3,
                                   num_workers=0, checkpoint_every=6, no_fid=True, device="cpu"), **changes})


STEPS = 100  # enough for the tiny denoiser to learn a smooth field's structure, and none to find in noise


@pytest.mark.slow
def test_heldout_loss_is_lower_on_structured_latents_than_on_white_noise(tmp_path):
    g = torch.Generator().manual_seed(1)
    fields = {"smooth": smooth_field(72, 4, 8, seed=1), "noise": torch.randn(72, 4, 8, 8, generator=g)}
    s = probe_settings(denoiser="tiny", steps=STEPS, batch_size=16, learning_rate=1e-3, checkpoint_every=1000)
    losses = {}
    for name, z in fields.items():
        latents = dict(mean=z[:64], std=torch.zeros_like(z[:64]))
        losses[name] = train_probe(name, latents, z[64:], s, tmp_path)["heldout_loss"]
    assert losses["noise"] > 0.9 * dn.white_noise_loss()  # no structure to learn: at (or above) the linear optimum
    assert losses["smooth"] < 0.6 * losses["noise"]


@pytest.mark.slow
def test_training_batches_are_the_same_for_every_vae_and_resume_exactly(tmp_path):
    a = dict(mean=torch.randn(10, 4, 8, 8), std=torch.rand(10, 4, 8, 8))
    b = dict(mean=torch.randn(10, 4, 8, 8) * 3, std=torch.rand(10, 4, 8, 8))
    za, ta, ea = dn.training_batch(a, 5, 4, 0, "cpu")
    zb, tb, eb = dn.training_batch(b, 5, 4, 0, "cpu")
    assert torch.equal(ta, tb) and torch.equal(ea, eb)
    assert not torch.equal(dn.training_batch(a, 6, 4, 0, "cpu")[1], ta)
    heldout = torch.randn(3, 4, 8, 8)
    s = probe_settings(steps=12, checkpoint_every=6)
    whole = train_probe("x", a, heldout, s, tmp_path / "whole")
    train_probe("x", a, heldout, probe_settings(steps=6, checkpoint_every=6), tmp_path / "parts")
    resumed = train_probe("x", a, heldout, s, tmp_path / "parts")  # continues from checkpoint 6
    assert resumed["steps"] == 12
    assert resumed["heldout_loss"] == pytest.approx(whole["heldout_loss"], rel=1e-5)
    assert [loss for _, loss in resumed["train_loss"]] == pytest.approx([loss for _, loss in whole["train_loss"]],
                                                                          rel=1e-5)


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"garbage" * 10)


@pytest.mark.slow
@pytest.mark.parametrize("file, how", [("model.safetensors", "truncate"), ("model.safetensors", "garbage"),
                                       ("optimizer.pt", "truncate"), ("state.json", "garbage")])
def test_a_damaged_denoiser_checkpoint_is_named_and_the_one_before_it_resumed(tmp_path, capsys, file, how):
    latents, heldout = dict(mean=torch.randn(10, 4, 8, 8), std=torch.rand(10, 4, 8, 8)), torch.randn(3, 4, 8, 8)
    quick = dict(denoiser="tiny", checkpoint_every=2, eval_every=100)  # held-out losses at the end only: seconds
    s = probe_settings(steps=6, **quick)
    whole = train_probe("x", latents, heldout, s, tmp_path / "whole")
    parts = tmp_path / "parts"
    train_probe("x", latents, heldout, probe_settings(steps=4, **quick), parts)
    folder = parts / "denoisers" / "x"
    assert json.loads((folder / "state.json").read_text())["step"] == 4
    assert json.loads((parts / "denoisers" / "x.previous" / "state.json").read_text())["step"] == 2
    damage(folder / file, how)
    capsys.readouterr()
    with pytest.warns(UserWarning) as warned:
        resumed = train_probe("x", latents, heldout, s, parts)
    assert len(warned) == 1 and str(folder / file) in str(warned[0].message)
    assert "x.previous at step 2" in capsys.readouterr().out
    assert resumed["steps"] == 6 and resumed["heldout_loss"] == pytest.approx(whole["heldout_loss"], rel=1e-5)
    assert (parts / "denoisers" / "x.damaged" / file).is_file()  # set aside, never rotated in over an intact one
    assert json.loads((folder / "state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_with_every_denoiser_checkpoint_damaged_the_probe_starts_afresh(tmp_path):
    latents, heldout = dict(mean=torch.randn(10, 4, 8, 8), std=torch.rand(10, 4, 8, 8)), torch.randn(3, 4, 8, 8)
    s = probe_settings(denoiser="tiny", steps=4, checkpoint_every=2, eval_every=100)
    fresh = train_probe("x", latents, heldout, s, tmp_path / "fresh")
    damage(tmp_path / "fresh" / "denoisers" / "x" / "model.safetensors", "truncate")
    damage(tmp_path / "fresh" / "denoisers" / "x.previous" / "optimizer.pt", "truncate")
    with pytest.warns(UserWarning) as warned:
        again = train_probe("x", latents, heldout, s, tmp_path / "fresh")
    assert [w.message.args[0].endswith(end) for w, end in zip(warned, ("x.previous", "starts afresh"))] == [True, True]
    assert "model.safetensors" in str(warned[0].message) and "optimizer.pt" in str(warned[1].message)
    assert again["train_loss"] == fresh["train_loss"] and again["heldout_loss"] == fresh["heldout_loss"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One probe of three VAEs: a tiny VAE, the same weights again, and a 16-channel one."""
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(root / "four")
    build_vae("tiny").save_pretrained(root / "other")
    build_vae("tiny-16ch").save_pretrained(root / "sixteen")  # the SD3 / FLUX layout: no quant convs
    photos = write_photos(root / "photos", size=64)
    vaes = {"a": str(root / "four"), "b": str(root / "four"), "c": str(root / "sixteen")}
    result = probe(vaes, str(photos), str(root / "out"), probe_settings(val_data=str(photos)))
    return dict(root=root, photos=photos, result=result, out=root / "out")


@pytest.mark.slow
def test_probe_writes_every_output_and_two_copies_of_a_vae_get_identical_figures(probed):
    out = probed["out"]
    for name in ("metrics.json", "table.md", "spectrum.png", "probe_loss.png", "samples.png", "equivariance.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    a, b, c = (saved["vaes"][v] for v in "abc")
    assert c["latent_channels"] == 16 and a["latent_channels"] == 4
    # same images, crops, batches, t and noise: two copies of one VAE cannot differ anywhere
    for key in ("statistics", "spectrum", "equivariance", "noise"):
        assert a[key] == b[key], key
    assert a["probe"]["heldout_loss_per_image"] == b["probe"]["heldout_loss_per_image"]
    assert a["probe"]["train_loss"] == b["probe"]["train_loss"]
    assert a["probe"]["steps"] == c["probe"]["steps"] == 12
    assert all(d["mean_difference"] == 0 for d in saved["paired"] if d["b"] == "b")
    assert "gFID skipped: turned off" in (out / "table.md").read_text()
    assert len(saved["heldout_images"]) == 3


@pytest.mark.slow
def test_probe_is_deterministic_and_a_rerun_reuses_finished_vaes(probed, capsys):
    root = probed["root"]
    again = probe({"a": str(root / "four")}, str(probed["photos"]), str(root / "again"),
                  probe_settings(val_data=str(probed["photos"])))
    first = probed["result"]["vaes"]["a"]
    assert again["vaes"]["a"]["probe"]["heldout_loss"] == first["probe"]["heldout_loss"]
    assert again["vaes"]["a"]["equivariance"] == first["equivariance"]
    probe({"a": str(root / "four")}, str(probed["photos"]), str(root / "again"),
          probe_settings(val_data=str(probed["photos"])))
    assert "results reused" in capsys.readouterr().out


@pytest.mark.slow
def test_probe_without_val_data_holds_out_every_tenth_image(tmp_path, vae_dir):
    photos = write_photos(tmp_path / "photos", size=64)
    for k in range(6):  # 12 images, sorted: the 1st and the 11th are held out
        (photos / f"copy{k}.png").write_bytes((photos / "astronaut.png").read_bytes())
    result = probe({"v": str(vae_dir)}, str(photos), str(tmp_path / "out"), probe_settings(steps=1))
    assert result["heldout_images"] == ["astronaut.png", "motorcycle.png"]
    assert result["vaes"]["v"]["train_images"] == 10


@pytest.mark.parametrize("argv, message", [
    (["--vae", "MISSING"], "no-such-vae"),
    (["--data", "EMPTY"], "no images"),
    (["--resolution", "60"], "multiple of 16"),
    (["--steps", "0"], "at least 1"),
    (["--denoiser", "huge"], "invalid choice"),
])
def test_bad_probe_inputs_fail_in_one_line_before_any_work(tmp_path, vae_dir, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    photos = write_photos(tmp_path / "photos", size=32, names=("astronaut", "coffee"))
    args = dict(zip(["--vae", "--data", "--out"], [str(vae_dir), str(photos), str(tmp_path / "out")]))
    extra = []
    for flag, value in zip(argv[::2], argv[1::2]):
        value = {"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "no-such-vae")}.get(value, value)
        (args.__setitem__(flag, value) if flag in args else extra.extend([flag, value]))
    with pytest.raises(SystemExit) if message == "invalid choice" else _no_raise():
        code = main(["probe", *[x for kv in args.items() for x in kv], *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
