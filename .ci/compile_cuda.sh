#!/usr/bin/env bash
# Compiles every CUDA source under csrc/ with nvcc -c for each target architecture, so that a
# kernel that does not compile never lands. Needs only nvcc and the CUDA runtime headers
# (no torch): the .cu files hold device code and plain launch functions only.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=(80 86 89 90)
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "compile_cuda: no .cu files under csrc/"
  exit 0
fi
GENCODE=()
for arch in "${ARCHS[@]}"; do
  GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for src in "${SOURCES[@]}"; do
  echo "compile_cuda: nvcc -c $src for sm_${ARCHS[*]}"
  # --threads 0: one host thread per architecture (nvcc compiles the targets in parallel)
  nvcc -c -std=c++17 -O3 --threads 0 -Icsrc "${GENCODE[@]}" "$src" -o "$OUT/$(basename "$src").o"
done
echo "compile_cuda: ${#SOURCES[@]} file(s) compiled for ${#ARCHS[@]} architectures"
