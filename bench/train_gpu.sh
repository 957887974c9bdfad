#!/usr/bin/env bash
# Train the project's weights on one GPU inside one device call (about 8 minutes of training).
#
# The GPU machine has torch, numpy, scipy, tqdm, matplotlib and safetensors, but not SimpleITK or
# pydantic, and cannot reach a registry. So:
#
# 1. Here, prepare the training slices into one tensor file and fetch the missing pure-Python wheels:
#      mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && echo /.whl/ >> .git/info/exclude
#      autocontour train --case examples/pelvis_ct/ct.nii.gz examples/pelvis_ct/labels.nii.gz --phantoms 24 \
#          --prepare-only --save-data .gpu/training_data.safetensors --out .gpu
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#          pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
#    (pin pydantic-core to what that pydantic release requires: `unzip -p .whl/pydantic-*.whl '*/METADATA' | grep core`).
# 2. There, with the device tool: run(command="bash bench/train_gpu.sh", carry=[".gpu", ".whl"], timeout_s=600).
#    It writes the checkpoint, curves and log to $OUT; copy $OUT/run/best.safetensors to
#    models/autocontour-universeg-v1.safetensors and update models/MODEL_CARD.md with the numbers.
OUT="${OUT:-/tmp/autocontour-gpu}"
source "$(dirname "$0")/gpu_setup.sh"
python3 -m app.cli train --data .gpu/training_data.safetensors --out "$OUT/run" --device cuda \
    --steps 20000 --max-seconds 450 --batch-size 16 --support-size 16 --lr 3e-4 \
    --heldout iliopsoas_left,iliopsoas_right,kidney_left,kidney_right,femur_left,femur_right,spleen \
    --validate-every 500 --checkpoint-every 500 --quiet 2>&1 | tee "$OUT/train.log"
cp "$OUT/run/training_log.csv" "$OUT/run/curves.png" "$OUT/run/best.safetensors" "$OUT/"
