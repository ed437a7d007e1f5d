"""The architectures `model:` can name, as plain data: the KL VAE presets (built as diffusers' AutoencoderKL) and the
tiny students (AutoencoderTiny, the TAESD network). No torch here: config checks read these names, and the CLI
imports config before it knows whether a command needs torch."""
from __future__ import annotations

PRESETS = {
    # Exactly the Stable Diffusion 1.x / 2.x VAE (KL-f8): 34,163,592 encoder + 49,490,179 decoder parameters.
    "sd-kl-f8": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=512,
    ),
    # The same 8x / 4-channel interface, small enough to train on a laptop CPU.
    "tiny": dict(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,  # a placeholder until measured on the training data
        sample_size=256,
    ),
    # The SD3 / SD3.5 and FLUX.1 VAE architecture: SD 1.x's blocks with 16 latent channels and no quant convs.
    # Their factors (SD3's here; FLUX.1: 0.3611 / 0.1159) are placeholders until measured at the end of the run.
    "kl-f8-16ch": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    ),
    # tiny with 16 latent channels in the SD3 / FLUX layout, for CPU runs.
    "tiny-16ch": dict(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=1.0,  # placeholders until measured on the training data
        shift_factor=0.0,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}



def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'. Presets: {', '.join(PRESETS)}")
    levels = len(PRESETS[name]["block_out_channels"])
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        act_fn="silu",
        **PRESETS[name],
    )


STUDENT_PRESETS = {
    # madebyollin/taesd: 64 channels throughout, about 1.22M parameters per half; for SD-sized teachers
    # (17x fewer decode MACs than sd-kl-f8's decoder).
    "taesd": dict(encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4),
    # The same layout at 16 channels (77K parameters per half): 14x fewer decode MACs than the `tiny` preset,
    # whose decoder costs about as much as TAESD's.
    "taesd-16": dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4),
}



def is_student(model: str) -> bool:
    return model in STUDENT_PRESETS
