"""The OpenAI-compatible HTTP API, served by each ingress replica beside its gRPC server.

``protocol`` (request bodies as pydantic models -> the gRPC wire request ``cluster.validation`` checks),
``responses`` (response bodies, SSE frames, usage), ``errors`` (OpenAI's error shape and the HTTP status
of every refusal), ``metrics`` (Prometheus counters), ``app`` (the Starlette routes over one
``RequestPath``) and ``server`` (uvicorn on the replica's own event loop). See docs/api.md, "HTTP API".
"""
