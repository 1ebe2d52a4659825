"""Networks: shared layers, the U-Nets, EDM's preconditioning, the VAE and the FID Inception-v3."""
