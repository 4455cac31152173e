#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command (about 8 minutes on one H200):
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. the GPU tests (pytest -m gpu); 2. inference rows on ViT-B/16: fp32 / bf16 / fp16 autocast,
# each SDPA backend, vitkit vs timm vs transformers, and a per-operator profile of the bf16
# batch-256 cell; 3. torch.compile rows; 4. the CIFAR-10 recipe
# timed on CIFAR-format batches (generated: no dataset is downloaded), giving its time per epoch;
# 5. training memory and step time per strategy (FSDP rows need two GPUs); 6. optional digits
# recipe sweep (SWEEP=1), each run on the GPU.
# Runs from the repository root with the machine's own torch/timm/transformers (PYTHONPATH=src).
set -uo pipefail
out=${1:-${OUT:-/tmp/vitkit-gpu}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi -L
$py -c 'import torch, timm, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__, "transformers", transformers.__version__)'

step "GPU tests"
timeout 120 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_eval.py tests/test_model.py 2>&1 | tail -25

step "inference: ViT-B/16, fp32/bf16/fp16, SDPA backends"
timeout 180 $py benchmarks/infer.py --device cuda --models vit_base_patch16_224 \
    --batch-sizes 1,64,256 --dtypes ${DTYPES:-fp32,bf16} --sdpa-backends flash,efficient,cudnn,math \
    --bf16-weights --seconds-per-row 4

step "profile: ViT-B/16 bf16 autocast batch 256, vitkit vs timm per operator"
# the one cell where vitkit trailed timm (0.93x on the H200, 2026-11-30): where the time goes
timeout 120 $py benchmarks/infer.py --device cuda --models vit_base_patch16_224 \
    --batch-sizes 256 --dtypes bf16 --libraries timm --repeats 5 --profile

if [ "${SWEEP:-0}" = 1 ]; then
    step "digits sweep (${SWEEP_ARGS:-})"
    # shellcheck disable=SC2086
    timeout "${SWEEP_TIMEOUT:-240}" $py scripts/sweep.py --jobs "${SWEEP_JOBS:-12}" \
        --out /tmp/sweep ${SWEEP_ARGS:-}
    cp /tmp/sweep/sweep.json "$out/" 2>/dev/null
fi

step "training memory: 1 process, DDP x 2, FSDP x 2 (+ checkpointing), LoRA, linear"
# two processes need two GPUs (torchrun, nccl); one GPU gets the one-process rows only
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then rows=""; else rows="0,4,5"; fi
for model in vit_large_patch16_224 vit_huge_patch14_224; do
    timeout 600 $py benchmarks/memory.py --device cuda --model $model --steps 5 --rows "$rows"
done

step "CIFAR-10 recipe on generated CIFAR-format batches (time per epoch)"
$py - <<'EOF'
import os, pickle, numpy as np, pathlib
d = pathlib.Path("/tmp/cifar-10-batches-py"); d.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
n = int(os.environ.get("CIFAR_N", 10000))  # images per batch file (the real files hold 10,000)
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    labels = rng.integers(0, 10, n)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    with open(d / name, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels.tolist()}, f, protocol=2)
names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
with open(d / "batches.meta", "wb") as f:
    pickle.dump({b"label_names": names}, f, protocol=2)
EOF
timeout 150 $py -m vitkit train --config configs/cifar10.yaml --data /tmp/cifar-10-batches-py \
    --set epochs=2 --set warmup_epochs=1 --output /tmp/cifar-run --overwrite --no-progress
grep -h time_s /tmp/cifar-run/metrics.jsonl | tail -2

[ "${COMPILE:-1}" = 1 ] || exit 0
step "torch.compile: ViT-B/16 bf16 batch 256"
timeout 240 $py benchmarks/infer.py --device cuda --models vit_base_patch16_224 \
    --batch-sizes 256 --dtypes bf16 --compile --libraries timm --seconds-per-row 4
step "done"
