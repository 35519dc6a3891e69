#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a GPU host that has no network
# (Python 3.12, x86-64 Linux by default; PYVER=3.11 etc. for another Python).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/wheels"
mkdir -p "$dest"
pyver=${PYVER:-3.12}
for spec in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 diskcache==5.6.3 torchcodec==0.17.0 submitit==1.5.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "$spec"
done
ls -la "$dest"
