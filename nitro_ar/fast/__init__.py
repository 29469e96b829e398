"""Accelerated drop-in modules (filled in by the kernel issues)."""
