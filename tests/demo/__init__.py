"""Tests of rqvae.demo."""
