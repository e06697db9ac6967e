"""Triton kernels of mmfast (installed as ``mmfast.kernels``): see ``combine.py``.

Imported lazily by the ``triton`` backend; importing triton here would fix its
interpreter mode too early.
"""
