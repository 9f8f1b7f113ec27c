"""Reading and converting the official kakaobrain/rq-vae-transformer checkpoints.

load (reading model.pt / config.yaml safely) <- vae (RQ-VAE converter) <- transformer (RQ-Transformer
converter) <- convert (either, by ``arch.type``).
"""
