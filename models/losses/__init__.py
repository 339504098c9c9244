"""Loss terms: Haar, Gram, GAN (HQG-Net); illumination, structure (StillGAN); Laplacian perceptual (LaMEGAN)."""
