#!/usr/bin/env bash
# gpu_check.sh: the first-GPU-run check of lightning-cit (issue 17). Run from the repository root on one H100/H200
# whose python3 has torch, lightning, transformers, peft and torchmetrics; bitsandbytes, datasets, jsonargparse
# (and pytest for the version test) come as wheels in ./.whl, made beforehand on a machine with network access:
#   bash ../shared/device/fetch-wheels.sh pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0
# Steps, in priority order, each under `timeout` within one budget (GPU_CHECK_BUDGET_S, default 450 s of the 8
# minutes); a failed step is recorded and the next one runs:
#   install    wheels into /tmp/site, the project editable
#   versions   tests/test_versions.py on this machine's (older) stack: the supported range's lower end
#   smoke      4-bit CUDA kernels; QLoRA build, forward/backward/generate on a 2-layer model at Llama-3-8B widths
#              (every LoRA tensor gets a gradient, an eval pass leaves gradients unchanged, fused = HF loss)
#   throughput benchmarks/throughput.py --device cuda (Llama-3-8B, seq 2048, micro-batch 1, checkpointing)
#   fit_single / fit_fsdp (+ _resume): `lightning-cit fit` on configs/gpu/*.yaml shrunk to the 2-layer model, then
#              a resume from the mid-task checkpoint; fit_ddp (no resume) when time is left
#   overhead   framework_over_plain on Llama-3-8B (only with >= 170 s left)
# Everything lands in $OUT/gpu.json (figures and goals) with $OUT/gpu_check.log; commit the figures to
# docs/results/performance.json ("gpu") with the device name.
# GPU_CHECK_DRY=1: the same harness on CPU with a tiny model (tests/test_gpu_check.py runs it in CI);
# GPU_CHECK_STEPS: comma-separated steps to run (default: all).
set -uo pipefail
START=$(date +%s); BUDGET=${GPU_CHECK_BUDGET_S:-450}; REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}; mkdir -p "$OUT"; LOG=$OUT/gpu_check.log; : > "$LOG"
WORK=$(mktemp -d -t gpu_check.XXXXXX); RES=$WORK/res; mkdir -p "$RES"
PY=${PYTHON:-python3}; DRY=${GPU_CHECK_DRY:-0}; ACCEL=cuda; [ "$DRY" = 1 ] && ACCEL=cpu
STEPS=${GPU_CHECK_STEPS:-install,versions,smoke,throughput,fit_single,fit_fsdp,fit_ddp,overhead}
H=benchmarks/gpu_check.py
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$DRY" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
record() {  # NAME RC SECONDS LOG [SKIP_REASON] -> $RES/step_NAME.json
  "$PY" -c 'import json,sys; n,rc,s,lf,sk,p=sys.argv[1:]; rc=int(rc)
t=open(lf,errors="replace").read()[-3000:] if lf!="-" else ""
json.dump({"name":n,"rc":rc,"ok":rc==0 and not sk,"seconds":float(s),"timed_out":rc in (124,137),"skipped":sk or None,"log_tail":t},open(p,"w"),indent=1)' \
    "$1" "$2" "$3" "$4" "${5:-}" "$RES/step_$1.json" || echo "{\"name\":\"$1\",\"rc\":$2}" > "$RES/step_$1.json"; }
step() {  # NAME MAX_S MIN_S CMD...: CMD under timeout, capped by the budget left
  local name=$1 max=$2 min=$3 left t rc t0 lf=$WORK/$1.log; shift 3
  left=$(( BUDGET - ($(date +%s) - START) )); t=$(( left - 15 )); (( t > max )) && t=$max
  if (( t < min )); then log "SKIP $name (${left}s left)"; record "$name" 0 0 - budget; return 1; fi
  log "RUN $name (timeout ${t}s): $*"; t0=$(date +%s.%N)
  timeout -k 10 "$t" "$@" > "$lf" 2>&1; rc=$?
  cat "$lf" >> "$LOG"; log "END $name rc=$rc"
  record "$name" "$rc" "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" "$lf"; return $rc; }

# Llama-3-8B widths (vocab 128256, hidden 4096, ffn 14336, GQA 32/8) with 2 layers: real kernel shapes, loads in seconds
SMALL=$WORK/llama3_8b_2l.json
W='"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256'
[ "$DRY" = 1 ] && W='"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512'
echo "{\"model_type\": \"llama\", $W, \"num_hidden_layers\": 2, \"rope_theta\": 500000.0, \"max_position_embeddings\": 8192, \"tie_word_embeddings\": false}" > "$SMALL"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader 2>/dev/null || echo none; } > "$RES/smi.txt"
log "repo=$REPO work=$WORK dry=$DRY steps=$STEPS gpu=$(cat "$RES/smi.txt")"

# 1. install: wheels -> /tmp/site; the project editable (its callbacks/ and datamodules/ are mapped into lightning_cit)
cat > "$WORK/install.sh" <<'SHEOF'
[ "$3" = 1 ] && { echo "dry run: the current environment"; exit 0; }
ls .whl/*.whl || { echo "no ./.whl: bring the wheels made by ../shared/device/fetch-wheels.sh"; exit 3; }
pipt() { "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${@:2}"; }
pipt "$1" .whl/*.whl || for w in .whl/*.whl; do pipt "$1" "$w" || echo "FAILED wheel $w"; done  # one bad wheel must not stop the rest
PYTHONPATH=/tmp/site "$1" -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
  echo "editable install failed: symlinking the package-dir mapping"
  [ -e lightning_cit/callbacks ] || ln -s ../callbacks lightning_cit/callbacks; [ -e lightning_cit/datamodules ] || ln -s ../datamodules lightning_cit/datamodules; }
PYTHONPATH=/tmp/site:$2 "$1" -c "import bitsandbytes, jsonargparse, lightning_cit.callbacks, lightning_cit.datamodules; print('imports ok')"
SHEOF
wanted install && step install 150 20 bash "$WORK/install.sh" "$PY" "$REPO" "$DRY"
[ "$DRY" = 1 ] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$REPO:$REPO/benchmarks:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}

# 2. the version test on this stack; 3. smoke; 4. the headline benchmark (Llama-3-8B, seq 2048, micro-batch 1)
wanted versions && step versions 60 15 "$PY" -m pytest -q -p no:cacheprovider tests/test_versions.py
wanted smoke && step smoke 150 30 "$PY" "$H" smoke "$RES/smoke.json" "$ACCEL" "$SMALL"
if wanted throughput; then
  if [ "$DRY" = 1 ]; then step throughput 60 10 "$PY" "$H" headline "$RES/throughput.json" cpu "$SMALL"
  else step throughput 210 90 "$PY" benchmarks/throughput.py --device cuda --skip-overhead --pairs 20 --warmup 5 --out "$RES/throughput.json"; fi
fi

# 5. `lightning-cit fit` (python -m lightning_cit.cli = the same main()) then resume from the mid-task checkpoint
fit_pair() {  # NAME SRC MODE RESUME
  local root=$WORK/$1 mid
  "$PY" "$H" mkcfg "$2" "$1" "$WORK" "$RES" "random:$SMALL" "$ACCEL" "$3" || { record "$1" 1 0 - "mkcfg failed"; return 0; }
  step "$1" 150 40 "$PY" -m lightning_cit.cli fit --config "$WORK/$1.yaml" || return 0
  [ "$4" = 1 ] || return 0
  mid=$(ls "$root"/checkpoints/epoch=0-step=2*.ckpt 2>/dev/null | head -1)
  if [ -n "$mid" ]; then step "$1_resume" 120 35 "$PY" -m lightning_cit.cli fit --config "$WORK/$1_r.yaml" --ckpt_path "$mid"
  else record "$1_resume" 1 0 - "no epoch=0-step=2 checkpoint"; fi; }
wanted fit_single && fit_pair fit_single configs/gpu/llama3_8b_qlora.yaml single 1
wanted fit_fsdp && fit_pair fit_fsdp configs/gpu/llama3_8b_qlora_fsdp.yaml "$([ "$DRY" = 1 ] && echo cpufsdp || echo fsdp)" 1
wanted fit_ddp && fit_pair fit_ddp configs/gpu/llama3_8b_qlora_ddp.yaml "$([ "$DRY" = 1 ] && echo cpuddp || echo ddp)" 0

# 6. optional: lightning-cit's per-step cost over a plain PyTorch + PEFT loop on Llama-3-8B
[ "$DRY" = 1 ] || { wanted overhead && step overhead 230 170 "$PY" "$H" overhead "$RES/overhead.json" 10 3; }

timeout 90 "$PY" "$H" summarize "$RES" "$OUT/gpu.json" "$START" "$BUDGET" 2>&1 | tee -a "$LOG" || echo '{"error": "summary failed, see gpu_check.log"}' > "$OUT/gpu.json"
log "done: $OUT/gpu.json"
