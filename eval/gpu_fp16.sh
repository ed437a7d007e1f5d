#!/usr/bin/env bash
# fp16 against fp32 decode of an overflowing SD-architecture VAE before and after sdvae fp16-fix's exact rescaling,
# on one GPU at 512 and 1024 px (the rows of eval/results/bench_fp16_cpu.md). Needs sdvae installed with its
# dependencies; writes eval/results/bench_fp16_cuda.{md,json} (or $OUT/ when set).
set -euo pipefail
cd "$(dirname "$0")/.."
python eval/bench_fp16.py --device cuda --sizes 512 1024 --repeats 10 --out "${OUT:-eval/results}/bench_fp16_cuda"
