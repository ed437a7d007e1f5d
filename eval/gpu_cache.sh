#!/usr/bin/env bash
# cache-latents on one GPU against the encoder alone, at 256 and 512 px in bf16 (the rows of
# eval/results/bench_cache_scale_cpu.md, for a GPU). Needs sdvae installed with its dependencies and
# ../shared/data/tiny-imagenet-val; writes eval/results/bench_cache_scale_cuda.{md,json} (or $OUT/ when set).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-eval/results}/bench_cache_scale_cuda"
python eval/bench_cache_scale.py --device cuda --dtype bf16 --model sd-kl-f8 --resolutions 256 512 \
    --layouts 1x8 --images 2000 --batch-size 32 --shard-size 500 --num-workers 7 --out "$out"
