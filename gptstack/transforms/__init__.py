"""Transforms applied to a built model from outside: quantization, the decode layout and its C kernels, LoRA.

They sit below checkpoint.py (which rebuilds a quantized structure before loading) and above model.py.
"""
