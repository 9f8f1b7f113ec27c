"""Tests of rqvae.data."""
