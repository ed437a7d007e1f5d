"""sdvae: train, fine-tune and use Stable-Diffusion-style KL autoencoders (diffusers AutoencoderKL)."""
__version__ = "0.1.0"
__all__ = ["load_vae", "VAECodec"]


def __getattr__(name):  # lazy: `sdvae --help` should not wait for torch and diffusers to import
    if name in __all__:
        from . import codec
        return getattr(codec, name)
    raise AttributeError(f"module 'sdvae' has no attribute {name!r}")
