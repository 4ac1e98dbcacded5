"""Encoder-caching sampling for diffusers UNets."""
