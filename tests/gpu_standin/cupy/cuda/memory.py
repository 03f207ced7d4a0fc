"""``cupy.cuda.memory`` of the CuPy test stand-in."""

from cupy._device import MemoryPool, OutOfMemoryError

__all__ = ["MemoryPool", "OutOfMemoryError"]
