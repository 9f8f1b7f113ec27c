"""Evaluation: FID / IS / rFID with InceptionV3 from a local file, PSNR / SSIM, tokenizer metrics."""
