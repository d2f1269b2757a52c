"""`pdserve bench`: load generator and metrics for the gRPC API (see docs/bench.md)."""
