"""Prefill/decode serving loop (router, workers, HTTP API)."""
