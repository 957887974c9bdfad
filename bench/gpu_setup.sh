# Sourced by bench/gpu.sh and bench/train_gpu.sh on the GPU machine: install the carried pure-Python
# wheels (.whl/), put the project on the path, create $OUT (the caller sets its default) and record the card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
