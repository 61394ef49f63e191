#!/usr/bin/env bash
# Wheels the lent GPU's image lacks, fetched here (it has no network) into .whl/, which
# gpu_all.sh installs when present: FlashInfer, for its POD wrapper beside ours in the
# sweep. FlashInfer 0.5.3 is the newest whose wheel and needs fit the 64 MiB a device
# call carries (0.7's wheel alone is 62 MB); it JIT-builds its kernels with the image's
# nvcc. The image already has torch, ninja, einops and nvidia-ml-py.
#   bash benchmarks/gpu_wheels.sh        then carry .whl with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in flashinfer-python==0.5.3 "apache-tvm-ffi>=0.1,<0.2" nvidia-cudnn-frontend==1.32.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
du -sh .whl
