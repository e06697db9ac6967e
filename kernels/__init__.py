"""Triton kernels of mmfast (installed as ``mmfast.kernels``).

Not written yet: the Triton backend is tracked by issue 5, and
``mmfast.backends()["triton"]`` reports it as unavailable until then.
"""
