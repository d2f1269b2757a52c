#!/bin/sh
# Build, on the development machine, what the three device `run` calls carry (docs/benchmarks.md, "GPU").
# Each call's working tree must stay under 64 MiB, so the pieces travel in three folders:
#   .devcarry/nixl  nixl + nixl-cu13 wheels (CUDA 13 build, cp312)             ~57 MiB  -> call 1
#   .devcarry/a     first half of the SmolLM2 GGUF + pydantic/gguf wheels      ~50 MiB  -> call 2
#   .devcarry/b     second half of the SmolLM2 GGUF                            ~47 MiB  -> call 3
# (the GGUF alone is 94 MiB). Run from the repository root: sh device_check/prepare_carry.sh
set -eu
PY=${PY:-.venv/bin/python}
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry/nixl .devcarry/a .devcarry/b
download() {
  dest=$1; shift
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
download .devcarry/nixl nixl==1.5.1 nixl-cu13==1.5.1
download .devcarry/a pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  gguf==0.19.0
GGUF=$($PY -c "from engine.builtin import smollm2_gguf_path; print(smollm2_gguf_path())")
split -n 2 -d "$GGUF" .devcarry/gguf.part
mv .devcarry/gguf.part00 .devcarry/a/ && mv .devcarry/gguf.part01 .devcarry/b/
sha256sum "$GGUF" | cut -d' ' -f1 > .devcarry/b/gguf.sha256
du -sh .devcarry/* && du -sh --exclude=.git --exclude=.venv --exclude=.devcarry .
