"""Benchmarks that drive a whole Cloudland: ``cloudland bench scale`` (docs/scale.md)."""
