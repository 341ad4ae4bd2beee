"""Generative models: tokenizers, sampling, KV caches and the continuous-batching engine.

See docs/generation.md for the artifact contract and the protocol.
"""
