#!/usr/bin/env bash
# Install everything ascent_jax needs on a fresh Debian machine (run as root):
# the real Fashion-MNIST data (Debian package) and the Python package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
python -m pip install -q -e ".[test]"
