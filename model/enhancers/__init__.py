"""Volume in, volume out, in Bq/ml: the Enhancer contract and every implementation of it.

The uPETe diffusion enhancer, the supervised reference, the classical baselines, and the tiling and
quantitation they share. The node reaches them only through :mod:`model.enhance`.
"""
