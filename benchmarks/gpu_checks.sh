#!/usr/bin/env bash
# The GPU-machine checks recorded in docs/benchmarks.md, in one call (from the repository root, $OUT set):
#   bash benchmarks/gpu_checks.sh [init_speed] [init_70b] [varlen] [throughput] [step_ratio] [q4] [llava] [zero]
# Each step's full log goes to $OUT/<step>.log; this prints each return code, time and the lines that matter.
set -uo pipefail
source scripts/gpu_env.sh || exit 1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LAUNCH="python3 -m accelerate.commands.launch"
steps=${*:-init_speed throughput llava zero}

step() {
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - start)) s: $*"
}
losses() {  # first and last logged training loss of a run
    grep -o "'loss': '[0-9.e+-]*'" "$OUT/$1.log" | sed -n '1p;$p' | tr '\n' ' '; echo
}

for s in $steps; do case $s in
init_speed)
    step init_speed python3 benchmarks/init_speed.py --json "$OUT/init_speed.json"
    sed -n '/^device/,$p' "$OUT/init_speed.log" ;;
init_70b)
    # LLaMA-2-70B shapes, weights in CPU and in GPU memory, 4 layers projected to 80
    step init_70b python3 benchmarks/init_speed.py --preset 70b --out "$OUT"
    sed -n '/^LLaMA-2-70B/,$p' "$OUT/init_70b.log" ;;
throughput)
    # one process per variant, alternating repeats, same saved batches; rerunning this step resumes in
    # $THROUGHPUT_OUT (runs already there are skipped), so a long run can span several calls
    tp_out=${THROUGHPUT_OUT:-/tmp/throughput}
    step throughput python3 benchmarks/train_throughput.py --out "$tp_out" --time_budget_s "${THROUGHPUT_BUDGET_S:-420}"
    grep -E "rc=|time budget" "$OUT/throughput.log"; cat "$tp_out/table.md"
    mkdir -p "$OUT/throughput" && cp "$tp_out"/*.json "$tp_out"/*.log "$tp_out"/table.md "$OUT/throughput/" ;;
step_ratio)
    # MiLoRA/PiSSA vs LoRA step time, the three models trained in turn in one process
    step step_ratio python3 benchmarks/step_ratio.py --out "$OUT/step_ratio"
    cat "$OUT/step_ratio/step_ratio.md" ;;
q4)
    # 4-bit bases (QLoRA, QPiSSA, QMiLoRA; docs/benchmarks.md): the step ratio interleaved in one process first,
    # then the quantized throughput variants, one process per run, starting no new run once Q4_BUDGET_S (default
    # 380 s) have passed since this step began; rerunning it resumes the throughput runs in $Q4_OUT
    q4_began=$SECONDS
    step q4_ratio python3 benchmarks/step_ratio.py --load_in_4bit --methods lora,milora,pissa --out "$OUT/q4_ratio"
    cat "$OUT/q4_ratio/step_ratio.md"
    q4_out=${Q4_OUT:-/tmp/q4}
    q4_left=$(( ${Q4_BUDGET_S:-380} - (SECONDS - q4_began) ))
    step q4 python3 benchmarks/train_throughput.py --variants quantized --repeats 2 --out "$q4_out" \
        --time_budget_s "$(( q4_left > 1 ? q4_left : 1 ))"
    grep -E "rc=|time budget" "$OUT/q4.log"; cat "$q4_out/table.md"
    mkdir -p "$OUT/q4" && cp "$q4_out"/*.json "$q4_out"/*.log "$q4_out"/table.md "$OUT/q4/" ;;
varlen)
    # torch's varlen kernel against padded sdpa in bf16 (the CUDA tests of milora.attention)
    step varlen python3 -m pytest -q -p no:cacheprovider tests/milora/test_attention.py
    tail -3 "$OUT/varlen.log" ;;
llava)
    step llava $LAUNCH --num_processes 1 --mixed_precision bf16 recipes/sft.py recipes/tiny_llava_milora.yaml \
        --bf16 true --output_dir /tmp/llava --max_steps 40 --logging_steps 5
    losses llava; ls /tmp/llava /tmp/llava/merged | tr '\n' ' '; echo
    python3 -c "
import torch; from transformers import LlavaForConditionalGeneration
m = LlavaForConditionalGeneration.from_pretrained('/tmp/llava/merged'); print('merged LLaVA reloads:', type(m).__name__, sum(p.numel() for p in m.parameters()), 'params')" 2>&1 | tail -1 ;;
zero)
    step zero2 $LAUNCH --config_file deepspeed_configs/accelerate_zero2.yaml --num_processes 1 recipes/sft.py \
        recipes/tiny_milora.yaml --bf16 true --max_steps 20 --logging_steps 5 --output_dir /tmp/z2
    losses zero2
    step milora_init python3 -m milora.cli init --model tiny:llama --r 8 --out /tmp/tiny_init
    step zero3 $LAUNCH --config_file deepspeed_configs/accelerate_zero3.yaml --num_processes 1 recipes/sft.py \
        recipes/tiny_milora.yaml --milora_init_dir /tmp/tiny_init --bf16 true --max_steps 20 --logging_steps 5 \
        --merge false --output_dir /tmp/z3
    losses zero3; ls /tmp/z3 | tr '\n' ' '; echo
    step zero3_init_check $LAUNCH --config_file deepspeed_configs/accelerate_zero3.yaml --num_processes 1 \
        scripts/checks/zero3_init_check.py
    grep "^rank" "$OUT/zero3_init_check.log" ;;
esac; done
