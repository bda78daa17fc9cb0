#!/bin/bash
# issue 22: generation (fast engine, expand + export) and Eq. 7 judge, before (426c747) vs after (main), interleaved
export SPA_LITE_QUIET=1
PY=${PY:-python}  # BEFORE=<worktree of the old commit> AFTER=<this checkout>
uptime; lscpu | grep -i 'model name'
for i in 1 2; do
  for side in before after; do
    T=$BEFORE; [ $side = after ] && T=$AFTER
    (cd $T && PYTHONPATH=$T $PY bench/bench_generation.py --sides new --prompts 24 --repeats 1 --out /tmp/gen_${side}_$i.json > /tmp/gen_${side}_$i.log 2>&1)
    echo "gen $side $i rc=$? $(uptime)"
    (cd $T && PYTHONPATH=$T $PY $AFTER/bench/before_after/judge_worker.py $T 32 > /tmp/judge_${side}_$i.log 2>&1)
    echo "judge $side $i rc=$? $(uptime)"
  done
done
echo RETIMEDONE
