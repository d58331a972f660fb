#!/bin/bash
# Quiet-machine ATTN-decode at HEAD: cache buffers on 2 MB pages (the new default) and on 4 KB pages, alternating.
# Run on a quiet machine (nothing else running); wrote attn_decode_epyc_idle_{huge,4k}_pages_<HEAD>_{1,2}.json.
set -x
cd "$(dirname "$0")/../../.."
H=$(git rev-parse --short HEAD)
for i in 1 2; do
  for cp in huge 4k; do
    echo "load $(cat /proc/loadavg) $(date -u)"
    OMP_NUM_THREADS=1 .venv/bin/compactlm bench decode-attention --lengths 4k,16k,32k,64k --threads 1 --repeats 30 --cache-pages $cp -q --json benchmarks/results/attn_decode/attn_decode_epyc_idle_${cp}_pages_${H}_$i.json
  done
done
echo "done load $(cat /proc/loadavg) $(date -u)"
