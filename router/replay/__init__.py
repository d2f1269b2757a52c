"""Trace replay: routing policies compared on a simulated prefill pool (``python -m router.replay``)."""
