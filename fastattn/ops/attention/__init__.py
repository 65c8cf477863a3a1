"""Decoupled (DIF-SR) attention: torch reference, Triton kernels and the autograd Function."""
