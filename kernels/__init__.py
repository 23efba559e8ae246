"""Tandem's kernels: Triton kernels with torch references, picked per device by a registry."""
