#!/usr/bin/env bash
# Rebuild the shipped support sets from the example CT with the shipped recipes.
# The content hashes do not depend on the date, so a rebuild with unchanged code
# and data reproduces the same ids.
set -euo pipefail
cd "$(dirname "$0")/.."
CASE="examples/pelvis_ct/ct.nii.gz examples/pelvis_ct/labels.nii.gz"
SOURCE="examples/pelvis_ct: one real pelvic CT (3 mm) from wasserth/TotalSegmentator (Apache-2.0); labels are TotalSegmentator v1.3 predictions, not clinical contours"
for name in bladder anorectum ctvn; do
  autocontour support build "$name" --case $CASE --recipe "$name" --size 64 --symmetric \
    --source "$SOURCE" --description "$(python -c "import json;print(json.load(open('support_sets/recipes/$name.json'))['description'])")" \
    --out "support_sets/$name"
done
