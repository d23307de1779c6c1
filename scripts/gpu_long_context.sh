#!/usr/bin/env bash
# The long-context ablation on the lent GPU machine (docs/results.md holds what it measured).
# Each recipe of recipes/long-context/ trains in its own background process (setsid), all at once on one
# GPU, then `dijiang eval` scores it at 512 / 2048 / 8192-token windows on three texts, with its DiJiang
# branch switched off too, and passkey retrieval at 1k-8k; scripts/branch_weights.py records each head's
# branch weight (eval/branch_weights.json).
#   bash scripts/gpu_long_context.sh slice     # here, on the CPU, after scripts/build_corpus.py: .gpu_corpus
#   bash scripts/gpu_long_context.sh pack      # here, after ../shared/gpu/prepare.sh: .gpu_whl (the gguf and fla
#                                              # wheels) and call 2's size against the 64 MiB a call carries
#   bash scripts/gpu_long_context.sh stash     # call 1 (carries .gguf_a): the model's first half
#   bash scripts/gpu_long_context.sh start     # call 2 (carries .gguf_b .gpu_whl .gpu_corpus): model, launch
#   bash scripts/gpu_long_context.sh status    # later calls: one line per job; also collects (below) into $OUT;
#                                              # WAIT=540 first waits (up to 540 s) for the jobs to finish
#   bash scripts/gpu_long_context.sh collect   # everything small into $OUT/long_context.tar.gz
#   bash scripts/gpu_long_context.sh tests     # any call: the GPU-only tests (-m gpu), into $OUT/gpu_tests.txt
#   STOP="job ..." bash scripts/gpu_long_context.sh stop   # end those jobs (training or evaluation); the queue
#                                              # gives their slots to the next jobs
#   EVAL="job ..." bash scripts/gpu_long_context.sh evaluate   # score stopped jobs at their newest checkpoint
# .gpu_corpus/part-000.jsonl.xz: the slice of the training corpus (scripts/build_corpus.py) that every run trains on,
# small enough for a call: its SLICE_DOCS=468 longest documents (28.0M characters), in the corpus's own order.
# JOBS="baseline transform" picks recipes; TOKENS=2M overrides their token budget; PASSKEY=1024,... and
# PASSKEY_TRIALS=10 the passkey lengths and trials a length; PARALLEL=5 jobs train at once (each
# takes ~21 GiB at 8192-token blocks), the rest wait in a queue that outlives the call. A recipe named layer-choice*
# trains with the softmax layers that scripts/probe_layer_choice.py picks on the GPU first (the 4 best for
# needle retrieval, greedily), not with its own `layers`. map-* jobs (the feature-map ablation) skip passkey; every
# other job is also scored on retrieval documents of facts no run trains on (scripts/check_retrieval_data.py --seed 1;
# the teacher once in `start`, when a *-retrieval job is asked for). TEST_FILES picks the test files of `tests`
# (they share the GPU with training: the sixth batch's jobs ran at 11-12k tokens/s each beside them and a fifth job,
# 14k with four jobs after them).
set -uo pipefail
WORK=~/long_context
RUNS=$WORK/runs
export PYTHONPATH=~/site:$WORK/src PYTHONUNBUFFERED=1 DIJIANG_CACHE=~/dijiang_cache TOKENIZERS_PARALLELISM=true \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
JOBS=${JOBS:-baseline chi-decay transform layer-hybrid pure}
PARALLEL=${PARALLEL:-5}
export JOBS PARALLEL  # the queue (a child process) reads them
RETRIEVAL="--data $WORK/corpus/part-000.jsonl.xz --documents 12 --seed 1"  # facts no run trains on (training: seed 0)
TEXTS="--text pydoc --text data/heldout/austen-pride-and-prejudice.txt --text $WORK/python-stdlib.txt"

evaluate_command() {  # what scores job $1's model in $RUNS/$1/final (map-* jobs: no passkey, no retrieval documents)
  local job=$1 passkey="--passkey ${PASSKEY:-1024,2048,4096,8192} --passkey-trials ${PASSKEY_TRIALS:-10}"
  [[ $job == map-* ]] && passkey=""
  local command="python3 -m dijiang eval --teacher $HOME/model/hf --student $job=$RUNS/$job/final $TEXTS \
--windows 512,2048,8192 --branch-off --cache-memory $passkey --dtype bfloat16 --out $RUNS/$job/eval \
&& python3 scripts/branch_weights.py $job=$RUNS/$job/final --json $RUNS/$job/eval/branch_weights.json"
  [[ $job != map-* ]] && command="$command && python3 scripts/check_retrieval_data.py --model $RUNS/$job/final \
$RETRIEVAL --json $RUNS/$job/eval/retrieval.json"
  echo "$command"
}

case "${1:-}" in
slice)
  mkdir -p .gpu_corpus
  python3 - "${SLICE_DOCS:-468}" <<'PY' || exit 1
import json, lzma, sys
sys.path.insert(0, "scripts")
from build_corpus import iter_corpus
docs = list(iter_corpus(".corpus"))
count = int(sys.argv[1])
# the longest documents, ties broken by corpus position; written in corpus order (already shuffled by the build)
chosen = sorted(sorted(range(len(docs)), key=lambda i: (-len(docs[i]["text"]), i))[:count])
with lzma.open(".gpu_corpus/part-000.jsonl.xz", "wt", preset=9) as out:
    for i in chosen:
        out.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
chars = sum(len(docs[i]["text"]) for i in chosen)
print(f".gpu_corpus/part-000.jsonl.xz: {len(chosen)} of {len(docs)} documents, {chars / 1e6:.1f}M characters")
PY
  ;;
pack)
  # the wheels the GPU image lacks: gguf (loading the model) and fla (the delta rule's kernel, state_update: delta)
  mkdir -p .gpu_whl && rm -f .gpu_whl/*.whl && cp .whl/gguf-*.whl .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl \
    .gpu_whl/ || { echo "run ../shared/gpu/prepare.sh first"; exit 1; }
  python3 - <<'PY' || exit 1
import os, subprocess
tracked = sum(os.path.getsize(f) for f in subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
              "--exclude-standard"], capture_output=True, text=True, check=True).stdout.split("\0") if os.path.isfile(f))
carried = sum(os.path.getsize(os.path.join(d, f)) for d in (".gguf_b", ".gpu_whl", ".gpu_corpus") for f in os.listdir(d))
total, limit = tracked + carried, 64 * 2**20
print(f"call 2 carries {total / 2**20:.1f} MiB (working tree {tracked / 2**20:.1f} + .gguf_b .gpu_whl .gpu_corpus "
      f"{carried / 2**20:.1f}) of {limit / 2**20:.0f} MiB")
raise SystemExit(0 if total <= limit else "over the limit: carry less")
PY
  ;;
stash)
  mkdir -p ~/stash && cp .gguf_a/* ~/stash/ && ls -la ~/stash
  ;;
start)
  python3 -m pip install -q --no-index --no-deps --target ~/site .gpu_whl/*.whl || exit 1
  mkdir -p ~/model $RUNS
  cat ~/stash/*.part0 .gguf_b/*.part1 > ~/model/smollm2.gguf
  [ "$(md5sum < ~/model/smollm2.gguf | cut -d' ' -f1)" = "$(cat .gguf_b/*.md5)" ] || { echo "model md5 differs"; exit 1; }
  cp -r src scripts data recipes $WORK/ && mkdir -p $WORK/corpus && cp .gpu_corpus/*.jsonl.xz $WORK/corpus/
  cd $WORK
  # a third evaluation text of another kind: Python source code (the corpus holds no Python)
  cat $(python3 -c "import argparse, inspect, typing; print(argparse.__file__, inspect.__file__, typing.__file__)") \
    > $WORK/python-stdlib.txt
  python3 -c "import dijiang; m, t = dijiang.load_pretrained('$HOME/model/smollm2.gguf'); \
dijiang.conversion.save_converted(m, t, '$HOME/model/hf')" > $RUNS/prepare.log 2>&1 || { tail $RUNS/prepare.log; exit 1; }
  if [[ " $JOBS " == *" layer-choice"* ]]; then
    # filler for the needle prompts: one long corpus document (training text, not an evaluation text)
    python3 -c "import json, lzma; d = next(json.loads(l) for l in lzma.open('corpus/part-000.jsonl.xz', 'rt') \
if json.loads(l)['source'] == 'gnu-info'); open('$WORK/filler.txt', 'w').write(d['text'])"
    python3 scripts/probe_layer_choice.py --model $HOME/model/hf --text $WORK/filler.txt --tokens 2048 \
      --prompts 8 --keep 6 --json $RUNS/layer_choice.json > $RUNS/layer_choice.log 2>&1 || { tail $RUNS/layer_choice.log; exit 1; }
    grep -v Warn $RUNS/layer_choice.log | tail -n 8
    layers=$(python3 -c "import json; kept = json.load(open('$RUNS/layer_choice.json'))['rounds'][3]['kept']; \
print(' '.join(str(i) for i in range(30) if i not in kept))")
    echo "$layers" > $RUNS/layer_choice_layers.txt
  fi
  if [[ "$JOBS" == *-retrieval* ]]; then
    setsid nohup python3 scripts/check_retrieval_data.py --model $HOME/model/hf $RETRIEVAL \
      --json $RUNS/retrieval_teacher.json > $RUNS/retrieval_teacher.log 2>&1 < /dev/null &
  fi
  for job in $JOBS; do rm -f $RUNS/$job.launched $RUNS/$job.done; done
  # the queue outlives this call: at most PARALLEL jobs on the GPU at once (nine at once ran out of its 139 GiB)
  setsid nohup bash scripts/gpu_long_context.sh queue > $RUNS/queue.log 2>&1 < /dev/null &
  sleep 20; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
  ;;
queue)
  cd $WORK
  for job in $JOBS; do
    # wait for a free slot: a job holds one from its launch until its .done file appears
    while [ "$(for j in $JOBS; do [ -f $RUNS/$j.launched ] && [ ! -f $RUNS/$j.done ] && echo; done | wc -l)" -ge "$PARALLEL" ]; do
      sleep 10
    done
    train="python3 -m dijiang train --recipe recipes/long-context/$job.yaml --model $HOME/model/hf \
--data $WORK/corpus/part-000.jsonl.xz --out $RUNS/$job --no-progress ${TOKENS:+--tokens $TOKENS}"
    # the probe's pick, not the recipe's
    [[ $job == layer-choice* ]] && train="$train --layers $(cat $RUNS/layer_choice_layers.txt)"
    evaluate=$(evaluate_command $job)
    echo "$(date +%T) launch $job"
    touch $RUNS/$job.launched
    bash -c "$train > $RUNS/$job.train.log 2>&1 && ($evaluate) > $RUNS/$job.eval.log 2>&1; echo \$? > $RUNS/$job.done" &
    # the first job tokenises the corpus and caches the packed blocks; the others (same block size) reuse them
    for _ in $(seq 120); do ls ~/dijiang_cache/blocks/*.pt > /dev/null 2>&1 && break; sleep 2; done
  done
  wait
  echo "$(date +%T) all done"
  ;;
status)
  cd $WORK
  # WAIT=540: stay in this call until every job is done or that many seconds have passed, collecting each minute,
  # so that polls follow one another with no gap (the machine goes back 30 s after a call, and the runs with it)
  deadline=$((SECONDS + ${WAIT:-0}))
  while [ $SECONDS -lt $deadline ] && [ "$(for j in $JOBS; do [ -f $RUNS/$j.done ] || echo; done | wc -l)" -gt 0 ]; do
    sleep 10
    if [ -n "${OUT:-}" ] && [ $((SECONDS % 60)) -lt 10 ]; then bash scripts/gpu_long_context.sh collect > /dev/null; fi
  done
  tail -n 3 $RUNS/queue.log 2>/dev/null
  for job in $JOBS; do
    log=$RUNS/$job/log.jsonl
    echo "== $job: done=$(cat $RUNS/$job.done 2>/dev/null || echo no) last: $(tail -n 1 $log 2>/dev/null | cut -c1-260)"
    tail -c 400 $RUNS/$job.train.log 2>/dev/null | tr '\r' '\n' | tail -n 2
    [ -f $RUNS/$job.eval.log ] && tail -n 3 $RUNS/$job.eval.log
  done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  # every poll brings back what is there so far: the machine goes back 30 s after a call, and with it the runs
  if [ -n "${OUT:-}" ]; then bash scripts/gpu_long_context.sh collect > /dev/null; fi
  ;;
evaluate)
  # score stopped jobs from their newest checkpoint (`dijiang export` writes it as final/), in the background
  cd $WORK
  for job in ${EVAL:?EVAL="job ..." names the stopped jobs to score}; do
    if [ ! -d $RUNS/$job/final ]; then
      python3 -m dijiang export $RUNS/$job --out $RUNS/$job/final > $RUNS/$job.export.log 2>&1 \
        || { echo "$job: export failed"; tail -n 3 $RUNS/$job.export.log; continue; }
      tail -n 1 $RUNS/$job.export.log
    fi
    setsid nohup bash -c "($(evaluate_command $job)) > $RUNS/$job.eval.log 2>&1; echo \$? > $RUNS/$job.done" \
      > /dev/null 2>&1 < /dev/null &
    echo "$(date +%T) evaluating $job"
  done
  ;;
stop)
  # match the jobs' own command lines (recipe path, student path), never this call's, which names them only in STOP
  job_processes() { echo "recipes/long-context/$1\.yaml|$RUNS/$1/final"; }  # training, evaluation
  for job in ${STOP:?STOP="job ..." names the jobs to stop}; do
    pkill -f "$(job_processes $job)" && echo "stopped $job" || echo "$job: nothing running"
  done
  # SIGTERM lets `dijiang train` finish its step and checkpoint it (then `evaluate` scores that step): wait for it
  for job in $STOP; do
    for _ in $(seq 120); do pgrep -f "$(job_processes $job)" > /dev/null || break; sleep 1; done
  done
  for job in $STOP; do  # the job's shell may be gone before it wrote its .done: the queue waits for that file
    [ -f $RUNS/$job.launched ] && [ ! -f $RUNS/$job.done ] && echo stopped > $RUNS/$job.done
  done
  ;;
collect)
  cd $RUNS
  tar czf "$OUT/long_context.tar.gz" --exclude='final' --exclude='checkpoints' --exclude='*.pt' \
    --exclude='*.safetensors' .
  ls -la "$OUT"
  ;;
tests)
  files=${TEST_FILES:-tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py tests/test_fast_decode.py tests/test_delta_rule.py}
  PYTHONPATH=~/site:$PWD/src timeout 400 python3 -m pytest -q -m gpu $files 2>&1 | tail -n 40 > "$OUT/gpu_tests.txt"
  tail -n 5 "$OUT/gpu_tests.txt"
  ;;
*) echo "usage: $0 slice|pack|stash|start|status|stop|evaluate|collect|tests" >&2; exit 2 ;;
esac
