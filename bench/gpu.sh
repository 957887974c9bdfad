#!/usr/bin/env bash
# The GPU engine benchmark in one device call (the issue's case: 200 slices x 5 structures x S=64).
#
# The GPU machine lacks SimpleITK, nibabel, pydantic(-settings) and MONAI: carry pure-Python wheels of
# pydantic, pydantic-core, pydantic-settings, python-dotenv, annotated-types, typing-inspection in .whl/
# (see bench/train_gpu.sh for the pip download line), then with the device tool:
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# and copy the printed lines into bench/RESULTS.md with the card's name.
OUT="${OUT:-/tmp/autocontour-bench}"
source "$(dirname "$0")/gpu_setup.sh"
for precision in bfloat16 float32; do
  python3 bench/engine.py --device cuda --precision "$precision" --queries 200 --support-size 64 \
      --naive-subset 8 2>&1 | tee "$OUT/engine-$precision.txt"
done
python3 bench/engine.py --device cuda --precision bfloat16 --queries 200 \
    --support-size 64 --naive-subset 4 --compile 2>&1 | tee "$OUT/engine-compiled.txt"
