"""KV-cache memory backends (vAttention lands here)."""
