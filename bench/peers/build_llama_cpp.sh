#!/bin/sh
# Build llama.cpp's llama-server and llama-batched-bench from the sources vendored in the
# llama-cpp-python sdist on the package registry (issue 12 acc 5, issue 13 acc 2): the peer the engine
# bench and the aiperf runs compare against. A bench step, never part of `make test`.
#
#   bench/peers/build_llama_cpp.sh [OUT_DIR]      (default /tmp/peers)
#
# Leaves OUT_DIR/llama.cpp/build/bin/{llama-server,llama-batched-bench,llama-bench}. ~10+ min on 2 cores.
# Env: PIP (default .venv/bin/python -m pip), JOBS (default 2), NICE (default 10), SDIST_VERSION (pin).
set -eu
OUT=${1:-/tmp/peers}
JOBS=${JOBS:-2}
NICE=${NICE:-10}
PIP=${PIP:-"$(dirname "$0")/../../.venv/bin/python -m pip"}
SPEC=llama-cpp-python${SDIST_VERSION:+==$SDIST_VERSION}
mkdir -p "$OUT"
# registry only: the sdist alone, no deps, no wheels
ls "$OUT"/llama_cpp_python-*.tar.gz >/dev/null 2>&1 || \
    $PIP download -q --no-deps --no-binary :all: "$SPEC" -d "$OUT"
SDIST=$(ls "$OUT"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
SRC="$OUT/$(basename "$SDIST" .tar.gz)"
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$OUT"
ln -sfn "$SRC/vendor/llama.cpp" "$OUT/llama.cpp"
cd "$SRC/vendor/llama.cpp"
# ggml's AMX kernels (Q4_0/Q4_1/Q8_0... weights, picked by default on an AMX CPU): GCC 12 drops the stores
# of the tile config before ldtilecfg (seen in the disassembly: only palette_id is written), so the first
# tile instruction raises SIGILL; an asm barrier keeps them (the cause upstream PR 26954 names). Idempotent.
MMQ=ggml/src/ggml-cpu/amx/mmq.cpp
grep -q '"r"(&tc) : "memory"' "$MMQ" || sed -i 's|^    _tile_loadconfig(&tc);|    asm volatile("" : : "r"(\&tc) : "memory");  // keep the config stores (GCC 12 drops them)\n    _tile_loadconfig(\&tc);|' "$MMQ"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF
nice -n "$NICE" cmake --build build -j "$JOBS" --target llama-server llama-batched-bench llama-bench
ls -la build/bin/llama-server build/bin/llama-batched-bench build/bin/llama-bench
