"""The errors a KV memory pool raises: each names what was asked and what is allowed."""

from __future__ import annotations


class KVPoolError(RuntimeError):
    """A request the pool cannot honour (out of range, not mapped, already closed...)."""


class DriverError(KVPoolError):
    """A driver or OS call failed; carries the call's name and the driver's own message."""

    def __init__(self, call: str, code: object, message: str) -> None:
        super().__init__(f"{call} failed: {message} ({code})")
        self.call = call
        self.code = code


class PhysicalMemoryError(DriverError):
    """The device or the OS has no physical memory left for another page."""
