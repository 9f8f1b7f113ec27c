"""Tests of rqvae.eval."""
