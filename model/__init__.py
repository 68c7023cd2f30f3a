"""uPETe model: autoencoder, Poisson latent diffusion, CT-guided U-Net, physics, phantoms, evaluation.

Knows nothing of DICOM; the node talks to it only through :mod:`model.enhance`.
"""
