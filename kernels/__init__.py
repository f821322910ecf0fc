"""Triton kernels of kmem, installed as ``kmem.kernels``.

Importing this package never imports Triton: each kernel module does so itself, so
CPU-only installs work without it.
"""
