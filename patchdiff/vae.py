"""Public entry points of the Stable Diffusion VAE (the code lives in `patchdiff.nn.vae`)."""
from patchdiff.nn.vae import decode_fn, encode_fn, latent_decoder, load_vae  # noqa: F401
