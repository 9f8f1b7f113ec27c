"""Tests of rqvae.codec."""
