"""What runs inside vLLM's engine processes: the engine core (the scheduler classes,
vAttention's page planner) and the workers (POD's attention backends, vAttention's pool).

Each engine's choices are read through `vllm_ext.config.ExtConfig`; nothing here imports
the front end or the tools.
"""
