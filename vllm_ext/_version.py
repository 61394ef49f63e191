"""vllm-ext's own version (the package metadata reads it from here too), in a module
that imports nothing, so that every layer may import it."""

__version__ = "0.1.0"
