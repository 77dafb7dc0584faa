#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md as one script that fits a few minutes on a GPU machine.
#   bash benchmarks/gpu_checks.sh [--tiny] OUT_DIR
# CHECKS=eval (default, under 8 minutes on one H100/H200): GSVA-7B in bf16 with random weights, 480x640 images,
#   10 expressions per image: teacher-forced evaluation images/s against the two-full-pass reference (batch 1/8/16,
#   SDPA and flash attention where installed), target mode `segment(targets=...)` (guarded), free generation, peak
#   memory, the 4-bit LLM's memory when bitsandbytes imports, and free generation on a dynamic cache, a static one
#   and a static one with torch.compile (last: it gets what is left of BUDGET).
# CHECKS=train: the training checks (bench_train, ZeRO-2 against the plain Trainer, export, segment, DeepSpeed
#   tests). CHECKS=pairs (under 4 minutes): the composed pair presets (benchmarks/bench_pairs.py). CHECKS=all: all
#   three (over 8 minutes: raise BUDGET).
# Wheels in .whl/ (transformers, peft, deepspeed and their missing needs) are installed first when present, for a
# machine that cannot reach a package index. Each step has its own time limit and a failing step does not stop the
# next, and a step is cut short or skipped to keep the whole run inside BUDGET seconds; every line goes to
# OUT_DIR/log.txt and the benchmark rows to OUT_DIR/*.json. --tiny rehearses it on CPU with the tiny preset
# (PRESET=configs/gsva-tiny DEVICE=cpu WHEELS=none, small images and batches).
set -u
TINY=0
if [[ ${1:-} == --tiny ]]; then TINY=1; shift; fi
OUT=${1:?usage: gpu_checks.sh [--tiny] OUT_DIR}
if (( TINY )); then
  PRESET=${PRESET:-configs/gsva-tiny} DEVICE=${DEVICE:-cpu} WHEELS=${WHEELS:-none} DTYPE=${DTYPE:-fp32}
  IMAGE=${IMAGE:-60} BATCHES=${BATCHES:-1,2} REPEATS=${REPEATS:-1} THREADS=${THREADS:-1}
fi
PRESET=${PRESET:-configs/gsva-7b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
IMAGE=${IMAGE:-480}
TARGETS=${TARGETS:-10}
BATCHES=${BATCHES:-1,8,16}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-0}
CHECKS=${CHECKS:-eval}
BUDGET=${BUDGET:-460}
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
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ATTN=sdpa
if python3 -c "import flash_attn" 2>/dev/null; then ATTN=sdpa,flash_attention_2; else echo "flash_attn not installed: SDPA only"; fi
PREPARED=(python3 benchmarks/bench_eval.py --prepared --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE"
  --image-size "$IMAGE" --targets "$TARGETS" --batch-sizes "$BATCHES" --repeats "$REPEATS" --threads "$THREADS")

eval_checks() {
  # Teacher-forced evaluation: this implementation and the two-full-pass reference on the same prepared batches
  # (decisions compared, masks' largest relative difference printed), per attention implementation.
  step eval_teacher_forced 170 "${PREPARED[@]}" --attn "$ATTN" --variants current,reference --json "$OUT/bench_eval.json"
  # Target mode: segment(processor, images, targets=[...]); a failing call prints a row naming the error.
  step eval_target_mode 110 "${PREPARED[@]}" --attn sdpa --variants current --target-mode --json "$OUT/bench_target_mode.json"
  # segment() end to end: target mode and free generation (answers forced to the same tokens every run).
  step bench_inference 90 python3 benchmarks/bench_inference.py --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --attn sdpa --batch-sizes "${BATCHES%,*}" --targets "$TARGETS" --image-size "$IMAGE" --repeats 2 --threads "$THREADS" \
    --json "$OUT/bench_inference.json"
  # The LLM in 4-bit (bitsandbytes) against bf16, both loaded from a saved random model (about 14 GB written).
  LOADS=none
  if [[ $DEVICE == cuda* ]] && python3 -c "import bitsandbytes" 2>/dev/null; then LOADS=4bit,none; else echo "bitsandbytes: not used here"; fi
  step saved_model "$(( TINY ? 60 : 170 ))" python3 benchmarks/bench_eval.py --load-ins "$LOADS" --preset "$PRESET" --device "$DEVICE" \
    --dtype "$DTYPE" --image-size "$IMAGE" --targets "$TARGETS" --batch-sizes "${BATCHES%,*}" --repeats 2 --threads "$THREADS" \
    --json "$OUT/bench_saved_model.json"
  # Free generation's KV cache: dynamic, static, and static with generate's torch.compile of the decoding step (CUDA).
  CACHES=dynamic,static
  [[ $DEVICE == cuda* ]] && CACHES+=,static-compiled
  step generate_caches 120 python3 benchmarks/bench_inference.py --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --attn sdpa --modes generate --caches "$CACHES" --batch-sizes "${BATCHES%,*}" --targets 3 --image-size "$IMAGE" \
    --repeats 2 --threads "$THREADS" --json "$OUT/bench_caches.json"
}

train_checks() {
  python3 -c "import peft; print('peft', peft.__version__)"
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
  COMMON=(--model_name_or_path "$WORK/preset" --dataset_dir "$WORK/data" --dataset refer_seg --sample_rates 1
    --refer_seg_data grefcoco
    --val_dataset "grefcoco|unc|val" --eval_batch_size 4 --max_steps 20 --warmup_steps 5 --per_device_train_batch_size 4
    --logging_steps 1 --save_steps 20 --bf16 --activation_checkpointing --report_to none --disable_tqdm true --seed 0)
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
}

pair_checks() {
  # Each pair preset of gsva_hf/pair_presets.py at its real size with random weights, built on the device in bf16:
  # target mode per image and full-LM AdamW steps (GSVA's freezing), time and peak memory (BENCHMARKS.md section 8).
  # One process per preset; GSVA-7B with activation checkpointing (bf16 weights + grads + AdamW states ~55 GB).
  # EdgeTAM's row reports itself skipped where timm does not import. --tiny: the same presets shrunk, on the CPU.
  local scale=real name extra
  (( TINY )) && scale=tiny
  for name in qwen2.5-vl-3b+sam2.1-hiera-l qwen3-vl-4b+sam2.1-hiera-b+ smolvlm2-2.2b+edgetam gsva-7b; do
    extra=()
    [[ $name == gsva-7b ]] && extra=(--checkpointing)
    step "pairs_$name" "$(( TINY ? 40 : 60 ))" python3 benchmarks/bench_pairs.py --preset "$name" --scale "$scale" \
      --device "$DEVICE" --dtype bfloat16 --batch 4 --steps 3 "${extra[@]}" --json "$OUT/bench_pairs_$name.json"
  done
}

case $CHECKS in
  eval) eval_checks ;;
  train) train_checks ;;
  pairs) pair_checks ;;
  all) eval_checks; train_checks; pair_checks ;;
  *) echo "CHECKS must be eval, train, pairs or all, got $CHECKS"; exit 2 ;;
esac
rm -rf "$WORK"
echo "=== total $(( $(date +%s) - T0 ))s"
