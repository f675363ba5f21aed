"""Triton kernels of the fused MoE data flow; each module holds one stage (see the package's reference.py)."""
