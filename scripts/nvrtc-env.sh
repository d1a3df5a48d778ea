# Sourced, not run: installs NVRTC from PyPI when libnvrtc is not already
# loadable and puts its lib folder on LD_LIBRARY_PATH (NVRTC loads
# libnvrtc-builtins from there). Lets a machine without the CUDA toolkit
# compile every kernel.
NVRTC_WHEEL="nvidia-cuda-nvrtc==13.0.88"
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
  nvrtc_lib() {
    python3 - <<'PY' 2>/dev/null
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    lib = os.path.join(root, "cu13", "lib")
    if os.path.exists(os.path.join(lib, "libnvrtc.so.13")):
        print(lib)
        break
PY
  }
  lib="$(nvrtc_lib)"
  if [ -z "$lib" ]; then
    python3 -m pip install --quiet "$NVRTC_WHEEL" >&2
    lib="$(nvrtc_lib)"
  fi
  if [ -z "$lib" ]; then
    echo "could not find or install $NVRTC_WHEEL" >&2
    return 1
  fi
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
