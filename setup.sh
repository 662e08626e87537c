#!/usr/bin/env bash
# Set up fer-swarm on this machine: system libraries OpenCV's GUI build needs, then a
# virtual environment in .venv with the package, the training extra and the test tools.
#   bash setup.sh            everything (TensorFlow included: train, tests)
#   bash setup.sh --runtime  broker, worker, edge, eval and demo only (a Raspberry Pi, a headset host)
set -euo pipefail
cd "$(dirname "$0")"

extras="[train,test]"
[ "${1:-}" = "--runtime" ] && extras=""

# opencv-python (not -headless: the edge shows a window) loads libGL and glib at import.
missing=()
ldconfig -p | grep -q 'libGL.so.1 ' || missing+=(libgl1)
ldconfig -p | grep -q 'libglib-2.0.so.0 ' || missing+=(libglib2.0-0)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
echo "fer-swarm installed in .venv: try .venv/bin/fer-swarm --help"
