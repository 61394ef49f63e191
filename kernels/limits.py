"""What POD-Attention runs, in a module free of Triton: an engine checks a model against
these before it decides whether the kernel is compiled or interpreted, which Triton
fixes when the kernel module is first imported."""

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


def leading_decodes(query_start_loc) -> int:
    """How many requests at the head of a batch have one query token: the decodes, as
    the kernel takes them (a host tensor; a one-token request after a longer one runs as
    a prefill tile, still exactly)."""
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    return next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
