"""What the weights are: every ``nn.Module`` and config a checkpoint rebuilds, and the checkpoint format.

Imports nothing else of ``model``: the autoencoder and CT encoder, the attention U-Net with CT-guided
cross-attention, the diffusion schedules, the uPETe model that joins them, the supervised reference
U-Net, and safetensors + JSON files (never a pickle).
"""
