"""Zeroth-order kernels: keyed directions, exact perturb/update, fused steps, replay."""
