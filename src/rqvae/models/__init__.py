"""The networks: residual quantizer, RQ-VAE, RQ-Transformer, discriminator, LPIPS, classifier, and the
``save_pretrained`` / ``from_pretrained`` folder format they share."""
