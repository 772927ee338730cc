#!/usr/bin/env bash
# Wheels the GPU machine lacks, fetched on this machine (where pip reaches the package registry) into the git-ignored
# .whl/ folder; benchmarks/gpu_session.sh installs them there (pip --no-index --no-deps --target /tmp/site) when the
# device call carries .whl. The GPU machine has Python 3.12, torch, torchvision, timm, Pillow and OpenCV, but not the
# `turbojpeg` wheel of the region JPEG decoder (--decoder turbo), which has no dependencies of its own.
#
#   bash benchmarks/device_wheels.sh                      # turbojpeg for CPython 3.12, manylinux x86_64
#   WHEELS="turbojpeg==0.0.2 other==1.0" bash benchmarks/device_wheels.sh
set -eu -o pipefail
PYVER=${PYVER:-3.12}
WHEELS=${WHEELS:-turbojpeg==0.0.2}
mkdir -p .whl
# shellcheck disable=SC2086  # WHEELS is a list
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
ls -l .whl
