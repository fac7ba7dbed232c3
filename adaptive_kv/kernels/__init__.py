"""Packed-KV kernels behind one dispatch point (see `dispatch.get_backend`)."""

from adaptive_kv.kernels.dispatch import KernelBackend, available_backends, get_backend

__all__ = ["KernelBackend", "available_backends", "get_backend"]
