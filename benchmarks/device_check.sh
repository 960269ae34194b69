#!/usr/bin/env bash
# The GPU figures (train step in float32 and bfloat16, whole-case inference with and without mirror TTA,
# peak GPU memory) in one run of benchmarks/device_check.py, with Keras on JAX: some GPU machines have JAX
# but no TensorFlow. About 3-5 minutes on one H100/H200-class GPU (an estimate: not yet run on one).
#
#   On a machine with pip and internet (once):  bash benchmarks/device_check.sh --fetch-wheels
#       downloads the pure-Python packages the check needs and JAX machines may lack into .whl/ (git-ignored)
#   On the GPU machine, from the repository root: bash benchmarks/device_check.sh [OUT.json] [extra args]
#       installs .whl/*.whl (if any) into /tmp/device-check-site, then runs the check; the JSON goes to
#       OUT.json (default results/benchmarks/device_check.json). Add its figures to benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# keras and what it needs beyond NumPy, h5py, rich, absl and ml-dtypes; nibabel; jsonschema (the config schema)
WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 nibabel==5.4.2 jsonschema==4.26.0
        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

out="${1:-results/benchmarks/device_check.json}"
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/device-check-site .whl/*.whl
    export PYTHONPATH="/tmp/device-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the peak memory is what the check used, not a preallocated pool
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 benchmarks/device_check.py --out "$out" "$@"
