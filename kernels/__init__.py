"""Triton kernels with plain-PyTorch references (POD-Attention lands here)."""
