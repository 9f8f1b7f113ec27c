"""Tests of rqvae.models."""
