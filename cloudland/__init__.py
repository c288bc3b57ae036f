"""Cloudland: a lightweight, OpenStack-compatible IaaS."""

__version__ = "0.1.0"
