"""sdvae: train, fine-tune and use Stable-Diffusion-style KL autoencoders (diffusers AutoencoderKL)."""
__version__ = "0.1.0"
