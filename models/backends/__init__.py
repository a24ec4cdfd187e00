"""Backends run a batch under a plan: eager PyTorch here, exported graphs in exporters.runtime."""
