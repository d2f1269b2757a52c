"""`python -m cluster.bench ...` runs `pdserve bench ...`."""

from __future__ import annotations

from cluster.bench.cli import bench

if __name__ == "__main__":
    bench()
