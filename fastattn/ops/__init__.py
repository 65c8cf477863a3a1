"""Kernels, their launchers, torch references and autograd Functions, one sub-package per op."""
