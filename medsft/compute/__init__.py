"""Model compute shared by training and the benchmarks: attention for packed rows (attention.py), the loss
kernels and the one forward the loop calls (kernels.py), FLOP counting and MFU (flops.py)."""
