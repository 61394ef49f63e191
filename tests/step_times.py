"""Step-time functions that tests hand to `vllm-ext simulate --step-time step_times:NAME`."""


def per_token(shape) -> float:
    """1 s a step plus 1/64 s per scheduled token: every time is exact in binary."""
    tokens = sum(n for n, _ in shape.chunks) + len(shape.decode_contexts)
    return 1.0 + tokens / 64


def negative(shape) -> float:
    return -1.0
