"""Tests of rqvae.train."""
