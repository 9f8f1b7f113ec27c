"""Tests of rqvae.official."""
