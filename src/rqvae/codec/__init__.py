"""A learned lossy image codec: RQ-VAE codes range-coded with the RQ-Transformer (or adaptive
frequencies) as the entropy model; ``rqvae compress`` / ``rqvae decompress``."""
