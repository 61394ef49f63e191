"""The front end: the process an operator starts (`vllm serve`'s API server, or a Python
program calling `LLM(**vllm_ext.engine_kwargs(...))`), before and beside the engine.

Before the engine starts it turns flags into components and components into engine
arguments, refusing what cannot run (`selection`, `flags`, `builtin/`); the registry and
hook specs let other packages add components the same way (`registry`, `hookspecs`,
`components`). While the engine runs it exports the engine's step records (`metrics`).
"""
