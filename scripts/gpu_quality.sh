#!/usr/bin/env bash
# Drives the quality run on the lent GPU machine (see docs/results_512.md for what it produced).
#   bash scripts/gpu_quality.sh start     # copy the tree, launch the job streams in the background (setsid)
#   bash scripts/gpu_quality.sh status    # one line per job
#   bash scripts/gpu_quality.sh collect   # report + results into $OUT
# Expects ~/model/smollm2.gguf, the corpus parts in .corpus/ (carried), wheels installed in ~/site.
set -uo pipefail
WORK=~/quality
RUNS=$WORK/runs
export PYTHONPATH=~/site:$WORK/src PYTHONUNBUFFERED=1 DIJIANG_CACHE=~/dijiang_cache TOKENIZERS_PARALLELISM=true
# Streams run side by side (one process each); jobs within a stream run one after another. Two streams fit
# an H100 (a window-hybrid process holds ~30 GiB at 8 x 1024); three OOMed. Override: STREAMS="a b;c d".
IFS=';' read -r -a STREAMS <<< "${STREAMS:-hybrid-lp hybrid-w128 hybrid-at;pure abl-dijiang abl-official abl-pff abl-performer abl-elu abl-dijiang-2d abl-two-softmax abl-dijiang-chi}"

case "${1:-}" in
start)
  mkdir -p $WORK/corpus $RUNS
  cp -r src scripts data recipes $WORK/
  cp .corpus/part-*.jsonl.xz $WORK/corpus/
  cd $WORK
  python3 -c "import dijiang; m, t = dijiang.load_pretrained('$HOME/model/smollm2.gguf'); \
dijiang.conversion.save_converted(m, t, '$HOME/model/hf')" > $RUNS/prepare.log 2>&1
  i=0
  for stream in "${STREAMS[@]}"; do
    i=$((i+1))
    cmd=""
    for job in $stream; do
      cmd+="python3 scripts/quality_run.py --job $job --model $HOME/model/hf --corpus $WORK/corpus --runs $RUNS > $RUNS/$job.out 2>&1; "
    done
    setsid nohup bash -c "$cmd echo done > $RUNS/stream$i.done" > /dev/null 2>&1 < /dev/null &
    [ ${#STREAMS[@]} -gt 1 ] && sleep 20  # let the first stream cache the packed corpus blocks before the others start
  done
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
  ;;
status)
  cd $WORK
  for f in $RUNS/*.out; do echo "== $(basename $f): $(tail -c 300 $f | tr '\n' ' ' | tail -c 200)"; done
  for job in $RUNS/*/log.jsonl; do echo "$job: $(tail -n 1 $job | cut -c1-220)"; done
  ls $RUNS/*.done 2>/dev/null
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  ;;
collect)
  cd $WORK
  python3 scripts/quality_run.py --report $RUNS
  cp docs/results_512.md docs/results_curves.png "$OUT"/ 2>/dev/null
  tar czf "$OUT/quality_runs.tar.gz" -C $RUNS --exclude='final' --exclude='checkpoints' --exclude='*.pt' .
  ;;
*) echo "usage: $0 start|status|collect" >&2; exit 2 ;;
esac
