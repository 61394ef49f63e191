"""The machine a figure or a cached measurement comes from, read without vLLM or a GPU."""

from __future__ import annotations


def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (/proc/cpuinfo); None where it does not."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.partition(":")[2].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None
