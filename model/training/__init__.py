"""Data to weights: the autoencoder and denoiser training loops, their data, patches, losses and settings."""
