"""Tests of rqvae.cli."""
