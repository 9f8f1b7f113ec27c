"""Reading and converting the official kakaobrain/rq-vae-transformer checkpoints."""
