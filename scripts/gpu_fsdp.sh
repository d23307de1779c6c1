#!/usr/bin/env bash
# FSDP on the lent one-GPU machine: the same `dijiang train` run plain and under accelerate's FSDP2 (one process,
# NCCL), for tokens/s, peak GPU memory (`gpu_peak_gib` in each log record) and the two loss curves.
#   bash scripts/gpu_fsdp.sh      # one call, carrying .fsdp_model and .gpu_corpus; logs come back in $OUT
# .fsdp_model: SmolLM2-135M's config and tokenizer (written here by the python line below); the weights are random
# (the 98 MB GGUF takes two calls to carry), which changes neither speed nor memory.
#   python -c "import dijiang; m, t = dijiang.load_pretrained('smollm2'); m.config.save_pretrained('.fsdp_model'); t.save_pretrained('.fsdp_model')"
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 DIJIANG_CACHE=~/dijiang_cache TOKENIZERS_PARALLELISM=true
WORK=~/fsdp
mkdir -p $WORK "$OUT"
python3 -c "
import torch, transformers
config = transformers.AutoConfig.from_pretrained('.fsdp_model')
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config).save_pretrained('$WORK/model')
transformers.AutoTokenizer.from_pretrained('.fsdp_model').save_pretrained('$WORK/model')
# ~3M characters of the corpus slice (~0.8M tokens): enough for the run, quick to tokenise
import json, lzma
with lzma.open('.gpu_corpus/part-000.jsonl.xz', 'rt') as f, open('$WORK/text.jsonl', 'w') as out:
    kept = 0
    for line in f:
        if kept < 3_000_000:
            out.write(line); kept += len(json.loads(line)['text'])" || exit 1
ARGS="--model $WORK/model --data $WORK/text.jsonl --tokens ${TOKENS:-512K} --block-size ${BLOCK:-2048} \
--batch-size ${BATCH:-8} --grad-accum 1 --attention window=128 radius=chi feature_transform=true --eval-data pydoc \
--eval-blocks 2 --eval-every 0 --save-every 0 --no-progress"
for run in plain fsdp1; do
  launcher="python3 -m dijiang train"
  [ $run = fsdp1 ] && launcher="accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 1 -m dijiang train"
  timeout ${RUN_LIMIT:-110} $launcher $ARGS --out $WORK/$run > "$OUT/$run.log" 2>&1
  echo "$run rc=$? $(grep -ho '"sharded": [a-z]*' $WORK/$run/checkpoints/*/state.json 2>/dev/null | tail -n 1)"
  cp $WORK/$run/log.jsonl "$OUT/$run.jsonl" 2>/dev/null
  python3 -c "
import json, statistics
log = [json.loads(l) for l in open('$OUT/$run.jsonl')]
steady = log[len(log) // 4:]  # past the kernels' first launches
print('$run: steps', len(log), 'median tokens/s', round(statistics.median(r['tokens_per_s'] for r in steady)),
      'peak GiB', round(max(r.get('gpu_peak_gib', 0) for r in log), 2), 'last loss', round(log[-1]['loss'], 4))" 2>&1 | tail -n 1
done
