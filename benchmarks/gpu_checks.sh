#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md (GPU section), as one script for a short lent-GPU session.
#   bash benchmarks/gpu_checks.sh OUT_DIR
# Wheels in .whl/ (transformers, peft, deepspeed and their missing needs) are installed first when present, for a
# machine that cannot reach a package index. Each step has its own time limit and a failing step does not stop
# the next, and a step is cut short or skipped to keep the whole run inside BUDGET seconds; every line goes to
# OUT_DIR/log.txt and the benchmark rows to OUT_DIR/*.json. PRESET=configs/gsva-tiny DEVICE=cpu WHEELS=none
# rehearses it on CPU.
set -u
PRESET=${PRESET:-configs/gsva-7b}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-560}
OUT=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/log.txt") 2>&1
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
WORK=$(mktemp -d)
T0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report rc and seconds
  local name=$1 limit=$2 start rc left
  shift 2
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 30 )); then echo "=== $name: skipped, ${left}s of the budget left"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"

step bench_train 200 python3 benchmarks/bench_train.py --preset "$PRESET" --device "$DEVICE" --dtype bf16 \
  --gradient-checkpointing --batch-size 4 --steps 10 --json "$OUT/bench_train.json"

# ZeRO-2 and the plain Trainer on the same full-width, few-layer model, seed and data: the losses should agree
# to bf16 rounding (ZeRO-2 keeps bf16 weights with fp32 master copies, the plain run fp32 weights under autocast).
python3 benchmarks/write_bench_preset.py "$PRESET" "$WORK/preset"
python3 - "$WORK/preset" <<'PY'
import sys
from configuration_gsva import GSVAConfig
config = GSVAConfig.from_pretrained(sys.argv[1])
for sub in (config.text_config, config.vision_config, config.sam_config.vision_config):
    sub.num_hidden_layers = 4
config.save_pretrained(sys.argv[1])
PY
python3 -m gsva_hf.data.synthetic --out "$WORK/data" --train 64 --val 8 --testA 0 --testB 0 >/dev/null
COMMON=(--model_name_or_path "$WORK/preset" --dataset_dir "$WORK/data" --dataset refer_seg --sample_rates 1 --refer_seg_data grefcoco
  --val_dataset "grefcoco|unc|val" --eval_batch_size 4 --max_steps 20 --warmup_steps 5 --per_device_train_batch_size 4
  --logging_steps 1 --save_steps 20 --bf16 --gradient_checkpointing --report_to none --disable_tqdm true --seed 0)
[[ $DEVICE == cpu ]] && COMMON+=(--use_cpu true)
step zero2_run 150 python3 -m torch.distributed.run --nproc_per_node 1 train_hf.py "${COMMON[@]}" --output_dir "$WORK/zero2" \
  --deepspeed configs/deepspeed_zero2.json
step plain_run 100 python3 train_hf.py "${COMMON[@]}" --output_dir "$WORK/plain"
python3 - "$WORK" <<'PY'
import json, sys
for run in ("zero2", "plain"):
    try:
        history = json.load(open(f"{sys.argv[1]}/{run}/checkpoint-20/trainer_state.json"))["log_history"]
    except OSError as error:
        print(run, "no trainer_state:", error)
        continue
    print(run, "loss per step:", [round(row["loss"], 4) for row in history if "loss" in row])
PY
ls -la "$WORK/zero2/checkpoint-20" "$WORK/zero2/final"
step segment_export 60 python3 -m gsva_hf.segment gsva_hf/assets/example.png \
  --targets "the red circle; the blue square" --model "$WORK/zero2/final" --out "$WORK/seg" --dtype bf16 --device "$DEVICE"
ls -R "$WORK/seg" | head -20

step bench_inference 150 python3 benchmarks/bench_inference.py --preset "$PRESET" --device "$DEVICE" --dtype bf16 \
  --attn sdpa --batch-sizes 1,8 --targets 1,3 --image-size 480 --json "$OUT/bench_inference.json"

step deepspeed_tests 60 python3 -m pytest -q -x tests/test_training.py -k deepspeed -p no:cacheprovider
echo "=== total $(( $(date +%s) - T0 ))s"
