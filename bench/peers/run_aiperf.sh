#!/bin/sh
# aiperf (NVIDIA's OpenAI-API benchmark client, from the registry, unmodified) closed-loop against one
# server: `pdserve serve` (the embedded default) or llama.cpp's llama-server on the same GGUF (issue 13 acc 2).
#
#   flock /tmp/pdserve-int.lock bench/peers/run_aiperf.sh pdserve      [OUT_DIR]
#   bench/peers/run_aiperf.sh llama-server                              [OUT_DIR]
#
# Starts the server on 127.0.0.1:$PORT, waits for it, runs aiperf at each concurrency of $LEVELS (chat
# completions, streaming, $ISL-token synthetic prompts, $OSL output tokens with ignore_eos, a fixed seed),
# stops the server (its PID only), then prints the table (bench/peers/aiperf_summary.py).
# Env: AIPERF (/tmp/aiperf-venv/bin/aiperf), TOKENIZER (/tmp/peers/smollm2-tokenizer, from
# bench/peers/tokenizer_dir.py), LLAMA_SERVER (/tmp/peers/llama.cpp/build/bin/llama-server), PORT (18000),
# LEVELS ("1 8 32"), ISL (128), OSL (64), REQUESTS_PER_STREAM (2; at least 8 requests per level),
# THREADS (llama-server -t, 2), GRPC_PORT (pdserve's gRPC, 18051), AFTER_UP (below).
set -eu
TARGET=$1
OUT=${2:-/tmp/peers/aiperf-$TARGET}
ROOT=${ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
AIPERF=${AIPERF:-/tmp/aiperf-venv/bin/aiperf}
TOKENIZER=${TOKENIZER:-/tmp/peers/smollm2-tokenizer}
LLAMA_SERVER=${LLAMA_SERVER:-/tmp/peers/llama.cpp/build/bin/llama-server}
PORT=${PORT:-18000}
LEVELS=${LEVELS:-"1 8 32"}
ISL=${ISL:-128}
OSL=${OSL:-64}
REQUESTS_PER_STREAM=${REQUESTS_PER_STREAM:-2}
THREADS=${THREADS:-2}
GRPC_PORT=${GRPC_PORT:-18051}
MODEL=smollm2-135m-instruct
GGUF=$("$ROOT/.venv/bin/python" -c "from engine.builtin import smollm2_gguf_path; print(smollm2_gguf_path())")
mkdir -p "$OUT"
[ -d "$TOKENIZER" ] || "$ROOT/.venv/bin/python" "$ROOT/bench/peers/tokenizer_dir.py" "$TOKENIZER"

case $TARGET in
  pdserve)
    (cd "$ROOT" && exec .venv/bin/pdserve serve --port "$GRPC_PORT" --http-port "$PORT") >"$OUT/server.log" 2>&1 &
    ;;
  llama-server)
    "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np 32 -t "$THREADS" -tb "$THREADS" \
        -c $((32 * 512)) --alias "$MODEL" --no-webui --no-repack >"$OUT/server.log" 2>&1 &
    # --no-repack: the AMX kernels a GGML_NATIVE build picks raise SIGILL on this VM (engine/bench_llama_cpp.py)
    ;;
  *) echo "usage: $0 pdserve|llama-server [OUT_DIR]" >&2; exit 2 ;;
esac
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
UP=
for _ in $(seq ${START_TIMEOUT_S:-600}); do  # a cluster start took 4-5 min at load average 15 on 2 cores
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && { UP=1; break; }
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/server.log"; exit 1; }
  sleep 1
done
[ -n "$UP" ] || { echo "$TARGET did not answer /health on $PORT"; tail -5 "$OUT/server.log"; exit 1; }
echo "$TARGET up on $PORT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
# AFTER_UP: a command run once the server answers, before aiperf (e.g. cluster.bench.engine_vs_cluster
# --server 127.0.0.1:$GRPC_PORT on the same pdserve), so one server start serves both measurements
[ -z "${AFTER_UP:-}" ] || (cd "$ROOT" && sh -c "$AFTER_UP")

for C in $LEVELS; do
  N=$((C * REQUESTS_PER_STREAM)); [ $N -ge 8 ] || N=8
  echo "concurrency $C, $N requests, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$AIPERF" profile --model "$MODEL" --url "http://127.0.0.1:$PORT" --endpoint-type chat --streaming \
      --tokenizer "$TOKENIZER" --concurrency "$C" --request-count "$N" --warmup-request-count 2 \
      --prompt-input-tokens-mean "$ISL" --prompt-input-tokens-stddev 0 \
      --prompt-output-tokens-mean "$OSL" --prompt-output-tokens-stddev 0 \
      --extra-inputs ignore_eos:true --use-legacy-max-tokens --random-seed 0 \
      --workers-max 2 --record-processor-service-count 1 --no-server-metrics --no-gpu-telemetry \
      --ui-type none --no-auto-plot --output-artifact-dir "$OUT/c$C" >"$OUT/c$C.log" 2>&1 \
      || { echo "aiperf failed at concurrency $C (log: $OUT/c$C.log)"; tail -30 "$OUT/c$C.log"; }
done
"$ROOT/.venv/bin/python" "$ROOT/bench/peers/aiperf_summary.py" "$TARGET" "$OUT"
