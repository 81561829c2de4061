"""The serving step's operations besides the delta linears: paged attention, the residual add with
its RMSNorm, SiLU-and-multiply, rotary embedding with the KV-cache write.

Each `<op>.py` holds the public entry point and its PyTorch reference (the CPU path); `<op>_triton.py`
the Triton kernel, imported on the first call with a CUDA fp16/bf16 tensor.
"""
