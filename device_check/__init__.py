"""``make device-check``: the GPU checks of issue 17 in one script, without Ray (``python3 -m device_check``).

Parts (``--parts``, default all): ``exactness`` (SmolLM2 on CUDA vs transformers on CUDA), ``decode`` and
``prefill`` (an 8B-shaped random bf16 model against the run's measured copy bandwidth and bf16 matmul
peak), ``nixl`` (a VRAM -> VRAM NIXL READ between two processes against a device-to-device copy).
On a machine without CUDA it exits 2 at once. docs/benchmarks.md ("GPU") gives the device command.
"""
