#!/bin/bash
# llm-compressor side re-run with the lm_head ignore fixed; our rows reused from the earlier JSONs of each setting.
cd /tmp/snap10p
export COMPACTLM_SNAPSHOT=bd1e86a PYTHONPATH=/tmp/snap10p/src OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
R=/work/main/benchmarks/results/prune
PY=/work/main/.venv/bin/python
run() { # out, from, args...
  out=$1; from=$2; shift 2
  /usr/bin/time -v $PY benchmarks/llmc_prune_side_by_side.py "$@" --threads 1 --skip-base-check --ours-from $R/$from \
    --note "2-core AMD EPYC shared with 3 single-thread RULER/APTQ runs and two helpers (load 4-6); llm-compressor side only, ours reused" \
    --json /work/runs10/$out   # copied to benchmarks/results/prune/ afterwards
}
run llmc_prune_side_by_side_headfix_50pct_wanda.json llmc_prune_side_by_side.json --methods wanda --sparsity 0.5
run llmc_prune_side_by_side_headfix_2of4.json llmc_prune_side_by_side_2of4.json --methods wanda,sparsegpt --pattern 2:4
run llmc_prune_side_by_side_headfix_50pct_sparsegpt.json llmc_prune_side_by_side_sparsegpt.json --methods sparsegpt --sparsity 0.5
run llmc_prune_side_by_side_headfix_4of8.json llmc_prune_side_by_side_4of8.json --methods wanda,sparsegpt --pattern 4:8
run llmc_prune_side_by_side_headfix_30pct_wanda.json llmc_prune_side_by_side_30pct.json --methods wanda --sparsity 0.3
run llmc_prune_side_by_side_headfix_30pct_sparsegpt.json llmc_prune_side_by_side_sparsegpt_30pct.json --methods sparsegpt --sparsity 0.3
