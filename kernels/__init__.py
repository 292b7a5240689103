"""lmrt's Triton kernels, installed as `lmrt.kernels` (never as a top-level `kernels`).

One op per module. Each module holds private `_<op>_*_kernel` Triton kernels and launchers on plain tensors
that know nothing of lmrt; the ops in `lmrt.ops` call the launchers. Importing this package imports no triton.
"""
