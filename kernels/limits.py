"""What POD-Attention runs, in a module free of Triton: an engine checks a model against
these before it decides whether the kernel is compiled or interpreted, which Triton
fixes when the kernel module is first imported."""

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
