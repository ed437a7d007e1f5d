"""The full LDM recipe: discriminator, adaptive weight, learned log-variance, EMA, fine-tuning, faults."""
import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdvae.layouts import diffusers_to_ldm
from sdvae.sources import load_pretrained_vae
from sdvae.weights import read_state_dict
from sdvae.discriminator import (NLayerDiscriminator, adaptive_weight, discriminator_loss, discriminator_term,
                                 generator_term)
from sdvae.losses import AutoencoderLoss
from sdvae.models import VAETrainingForward, build_vae
from sdvae.train import build_discriminator, train
from tests.test_train import config


def test_patchgan_is_ldms():
    disc = NLayerDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert disc(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.001
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 and abs(torch.cat([n.weight for n in norms]).mean().item() - 1) < 0.01


def test_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(expected.item())


def one_pass(disc_weight=0.5):
    torch.manual_seed(0)
    vae, disc = build_vae("tiny"), NLayerDiscriminator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, kl = VAETrainingForward(vae)(x)[:2]
    loss, nll, _ = AutoencoderLoss("l1", 0.0, 1e-6)(x, reconstruction, kl)
    return vae, disc, x, reconstruction, loss, nll


@pytest.mark.slow
def test_generator_loss_never_reaches_the_discriminator_and_vice_versa():
    vae, disc, x, reconstruction, loss, nll = one_pass()
    adversarial, logs = generator_term(disc, reconstruction, nll, vae.decoder.conv_out.weight, 0.5)
    (loss + adversarial).backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again for its own step
    assert vae.decoder.conv_out.weight.grad is not None and logs["adaptive_weight"] > 0

    vae.zero_grad(set_to_none=True)
    d_loss, _ = discriminator_term(disc, x, reconstruction, "hinge")
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())  # reconstructions were detached
    assert all(p.grad is not None for p in disc.parameters())


def test_adaptive_weight_is_ldms_ratio_clamped_and_detached():
    vae, disc, x, reconstruction, loss, nll = one_pass()
    g_loss = -disc(reconstruction).mean()
    last = vae.decoder.conv_out.weight
    a = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    b = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    weight = adaptive_weight(nll, g_loss, last, max_weight=1e4)
    torch.testing.assert_close(weight, a / (b + 1e-4))
    assert not weight.requires_grad
    assert adaptive_weight(nll, g_loss, last, max_weight=1e-9).item() == pytest.approx(1e-9)


def test_discriminator_norm_under_several_processes():
    cpu = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    gpus = types.SimpleNamespace(num_processes=2, device=torch.device("cuda"))
    cfg = config_values(disc_weight=0.5)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in build_discriminator(cfg, cpu).modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in build_discriminator(cfg, gpus).modules())
    with pytest.raises(ValueError, match="disc_norm=group"):
        build_discriminator(config_values(disc_weight=0.5, disc_norm="batch"), cpu)


def config_values(**kw):
    from sdvae.config import load_config
    return load_config(overrides=kw)


@pytest.mark.slow
def test_full_recipe_trains_and_exports_ema(tmp_path, photos):
    cfg = config(tmp_path, photos, max_steps=6, disc_weight=0.5, disc_start=3, learn_logvar=True, ema_decay=0.9,
                 ema_warmup=False)
    metrics = train(cfg)
    assert metrics["discriminator"] and metrics["exported_weights"] == "ema"
    assert "d_loss" in metrics["last_logged"] and "adaptive_weight" in metrics["last_logged"]
    assert "d_loss" not in metrics["first_logged"]  # steps 1-2 are before disc_start
    run = tmp_path / "run"
    raw = load_file(run / "checkpoint-6" / "model.safetensors")
    assert raw["logvar"].item() != 0.0  # the log-variance is optimised (LDM declares it and never does)
    exported = load_file(run / "vae" / "diffusion_pytorch_model.safetensors")
    ema = load_file(run / "checkpoint-6" / "ema.safetensors")
    assert len(ema) == len(exported)  # one shadow tensor per VAE parameter (all trained here)
    assert not torch.equal(exported["decoder.conv_out.weight"], raw["vae.decoder.conv_out.weight"])
    assert (run / "checkpoint-6" / "model_1.safetensors").is_file()  # the discriminator is checkpointed


def write_ldm_sd_checkpoint(path, preset="sd-kl-f8"):
    """A whole SD checkpoint in the original layout (random init), with the entries such files carry."""
    torch.manual_seed(0)
    vae = build_vae(preset)
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4)
    save_file(state, str(path))
    return vae


def test_ldm_layout_round_trips_through_diffusers_loader(tmp_path):
    vae = write_ldm_sd_checkpoint(tmp_path / "sd.safetensors", "tiny")
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in load_file(tmp_path / "sd.safetensors")
    loaded = load_pretrained_vae(str(tmp_path / "sd.safetensors"))
    assert list(loaded.config.block_out_channels) == [32, 64, 128, 128] and loaded.config.layers_per_block == 1
    original, again = vae.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_unsafe_pickles_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "ok.ckpt")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "callback": types.SimpleNamespace(a=1)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "evil.ckpt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained_vae(str(tmp_path / "missing.safetensors"))


@pytest.mark.slow
def test_decoder_only_fine_tune_keeps_the_encoder_bit_identical(tmp_path, photos):
    source = write_ldm_sd_checkpoint(tmp_path / "sd-v1.safetensors")
    cfg = config(tmp_path, photos, init_from=str(tmp_path / "sd-v1.safetensors"), train_decoder_only=True,
                 resolution=64, batch_size=1, max_steps=2, ema_decay=0.9, ema_warmup=False, learning_rate=1e-4)
    metrics = train(cfg)
    assert metrics["steps"] == 2
    exported = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    before = source.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(exported[k], before[k]) for k in frozen)
    assert not torch.equal(exported["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    # its latents stay the source's, and so do the factors diffusion models use them with
    assert json.loads((tmp_path / "run" / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert metrics["latent_factors"] == dict(measured=False, why="measure_factors=false", scaling_factor=0.18215,
                                             shift_factor=None)
    optimizer = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.bin", weights_only=True)
    decoder_params = sum(1 for k in before if k.startswith(("decoder.", "post_quant_conv.")))
    assert len(optimizer["param_groups"][0]["params"]) == decoder_params


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vae = build_vae("tiny")
        if checkpointing:
            vae.enable_gradient_checkpointing()
        x = torch.rand(1, 3, 32, 32)
        reconstruction, kl = VAETrainingForward(vae.train())(x)[:2]
        (reconstruction - x).abs().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


class FlakyLoss(AutoencoderLoss):
    """NaN on chosen calls, as a blown-up fp16 step would give."""
    calls = 0
    nan_from, nan_until = 10**9, 10**9

    def forward(self, *args, **kwargs):
        loss, nll, logs = super().forward(*args, **kwargs)
        FlakyLoss.calls += 1
        if FlakyLoss.nan_from <= FlakyLoss.calls < FlakyLoss.nan_until:
            loss = loss * float("nan")
        return loss, nll, logs


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, photos, monkeypatch):
    monkeypatch.setattr("sdvae.train.AutoencoderLoss", FlakyLoss)
    FlakyLoss.calls, FlakyLoss.nan_from, FlakyLoss.nan_until = 0, 3, 4
    metrics = train(config(tmp_path, photos, max_steps=5))
    assert metrics["steps"] == 5 and metrics["nonfinite_steps"] == 1
    weights = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path, photos, monkeypatch):
    monkeypatch.setattr("sdvae.train.AutoencoderLoss", FlakyLoss)
    FlakyLoss.calls, FlakyLoss.nan_from, FlakyLoss.nan_until = 0, 5, 10**9
    with pytest.raises(RuntimeError, match="checkpoint-3"):
        train(config(tmp_path, photos, max_steps=20, max_nonfinite_steps=3))
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3
    weights = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_decoder_only_fine_tune_of_a_vae_without_quant_convs(tmp_path, photos):
    """SD3 / FLUX VAEs have no quant_conv (use_quant_conv=False): freezing the encoder must not need one."""
    from diffusers import AutoencoderKL

    from sdvae.presets import preset_config

    torch.manual_seed(0)
    source = AutoencoderKL(**preset_config("tiny"), use_quant_conv=False, use_post_quant_conv=False)
    source.save_pretrained(tmp_path / "flux-like")
    metrics = train(config(tmp_path, photos, init_from=str(tmp_path / "flux-like"), train_decoder_only=True,
                           max_steps=1, checkpoint_every=100))
    assert metrics["steps"] == 1
    exported = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    before = source.state_dict()
    assert all(torch.equal(exported[k], before[k]) for k in before if k.startswith("encoder."))


@pytest.mark.slow
def test_a_non_finite_micro_batch_does_not_poison_its_accumulated_step(tmp_path, photos, monkeypatch):
    """With accumulation, a NaN micro-batch's gradients must not stay in .grad for the window's optimizer step."""
    monkeypatch.setattr("sdvae.train.AutoencoderLoss", FlakyLoss)
    FlakyLoss.calls, FlakyLoss.nan_from, FlakyLoss.nan_until = 0, 1, 2  # the first micro-batch of the first window
    metrics = train(config(tmp_path, photos, max_steps=3, gradient_accumulation_steps=2, checkpoint_every=100))
    assert metrics["steps"] == 3 and metrics["nonfinite_steps"] == 1
    weights = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
