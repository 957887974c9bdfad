#!/usr/bin/env bash
# Train the project's weights on one GPU (about 8 minutes of training): the CPU recipe of
# models/MODEL_CARD.md with 4x the batch and 2x the support size, in bf16.
#
# On a GPU host with the project installed (pip install -e . after a CUDA torch build, see docs/deployment.md):
#     bash bench/train_gpu.sh
# prepares the cross-patient training data from the shipped recipe (models/training_data_cpu-v2.json:
# both real patients, their virtual patients, the unlabelled DICOM example, phantoms) and trains.
#
# On the device tool's machine (torch, numpy, scipy, tqdm, matplotlib, safetensors; no SimpleITK, no
# pydantic, no registry), prepare here and carry the data and the missing pure-Python wheels:
#     mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && echo /.whl/ >> .git/info/exclude
#     autocontour train --recipe RECIPE --workers 2 --prepare-only --save-data .gpu/training_data.safetensors --out .gpu
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
#     run(command="bash bench/train_gpu.sh", carry=[".gpu", ".whl"], timeout_s=600)
# The full recipe's data file is about 770 MB and the tool carries 64 MiB, so RECIPE there has to be a
# reduced copy (one or two draws per patient, "crops": 2); say so in the model card if it is used.
# Results land in $OUT: copy $OUT/run/best.safetensors to models/ and update models/MODEL_CARD.md.
OUT="${OUT:-/tmp/autocontour-gpu}"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    source bench/gpu_setup.sh
else
    mkdir -p "$OUT"
fi
DATA=.gpu/training_data.safetensors
if [ ! -f "$DATA" ]; then
    mkdir -p .gpu
    python3 -m autocontour.cli train --recipe models/training_data_cpu-v2.json --workers 4 --prepare-only \
        --save-data "$DATA" --out .gpu
fi
python3 -m autocontour.cli train --data "$DATA" --out "$OUT/run" --device cuda \
    --from models/autocontour-universeg-v1.safetensors \
    --steps 20000 --max-seconds 450 --batch-size 16 --support-size 16 --lr 2e-4 \
    --heldout iliopsoas_left,iliopsoas_right,kidney_left,kidney_right,femur_left,femur_right,spleen \
    --validate-every 500 --checkpoint-every 500 --quiet 2>&1 | tee "$OUT/train.log"
cp "$OUT/run/training_log.csv" "$OUT/run/curves.png" "$OUT/run/best.safetensors" "$OUT/"
