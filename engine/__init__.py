"""engine: a Llama-family model runner on a paged KV cache with prefix caching (see docs/engine.md).

Entry points: ``engine.llm_engine.LLMEngine``, ``engine.config.EngineConfig``,
``engine.sampling.SamplingParams``; ``engine.block_hash`` is torch-free (the router imports it).
Importing this package imports nothing heavy.
"""
