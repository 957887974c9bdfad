#!/usr/bin/env bash
# Train on one GPU from the shipped weights on the clinic recipe: the CPU recipe of docs/training-and-weights.md
# with all 170 OpenKBP train patients, 4x the batch and 2x the support size, in bf16.
#
# On a GPU host with the project installed (pip install -e . after a CUDA torch build, see docs/deployment.md)
# and ../shared/data beside the checkout:
#     bash bench/train_gpu.sh                      # RECIPE=models/training_data_openkbp-gpu.json by default
# prepares the cross-patient training data (models/training_data_openkbp-gpu.json: every OpenKBP train patient's
# clinical organ contours, the 33 validation patients validated among themselves, both shared CTs and their
# virtual patients, the unlabelled DICOM example, phantoms; about 4 GB) and trains. RECIPE=... picks another
# (models/training_data_cpu-v2.json is v2's).
#
# On the device tool's machine (torch, numpy, scipy, tqdm, matplotlib, safetensors; no SimpleITK, no
# pydantic, no registry), prepare here and carry the data and the missing pure-Python wheels:
#     mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && echo /.whl/ >> .git/info/exclude
#     autocontour train --recipe RECIPE --workers 2 --prepare-only --save-data .gpu/training_data.safetensors --out .gpu
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
#     run(command="bash bench/train_gpu.sh", carry=[".gpu", ".whl"], timeout_s=600)
# The tool carries 64 MiB with the working tree: pack the prepared file (bench/gpu_pack.py, about 0.85 MB an
# OpenKBP patient) to .gpu/training_data.safetensors.xz, and prepare a reduced recipe (a few dozen patients);
# say so in the model card if it is used. STEPS, MAX_SECONDS, VALIDATE_EVERY, FROM and LR fit a run to the lease.
# Results land in $OUT: a checkpoint becomes the default only as docs/training-and-weights.md says.
OUT="${OUT:-/tmp/autocontour-gpu}"
RECIPE="${RECIPE:-models/training_data_openkbp-gpu.json}"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    source bench/gpu_setup.sh
else
    mkdir -p "$OUT"
fi
DATA=.gpu/training_data.safetensors
if [ ! -f "$DATA" ] && [ -f "$DATA.xz" ]; then  # carried packed (bench/gpu_pack.py)
    python3 bench/gpu_pack.py unpack "$DATA.xz" "$DATA"
fi
if [ ! -f "$DATA" ]; then
    mkdir -p .gpu
    python3 -m autocontour.cli train --recipe "$RECIPE" --workers 8 --prepare-only \
        --save-data "$DATA" --out .gpu
fi
RUN=/tmp/autocontour-gpu-run  # outside $OUT: the device tool brings back 8 files at most
rm -rf "$RUN"  # a warm machine keeps the last run's files: a failed run must not hand them back
set -o pipefail
python3 -m autocontour.cli train --data "$DATA" --out "$RUN" --device cuda \
    --from "${FROM:-models/autocontour-universeg-v2.safetensors}" \
    --steps "${STEPS:-20000}" --max-seconds "${MAX_SECONDS:-1800}" --batch-size 16 --support-size 16 --lr "${LR:-2e-4}" \
    --heldout iliopsoas_left,iliopsoas_right,kidney_left,kidney_right,femur_left,femur_right,spleen \
    --validate-every "${VALIDATE_EVERY:-500}" --checkpoint-every "${VALIDATE_EVERY:-500}" --quiet 2>&1 \
    | tee "$OUT/train.log"
cp "$RUN/training_log.csv" "$RUN/config.json" "$RUN/best.safetensors" "$OUT/"
