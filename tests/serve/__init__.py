"""Tests of rqvae.serve."""
