"""What runs inside omni-node: hosting, serving, residency, admission, swaps, stages, integrity."""
