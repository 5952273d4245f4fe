#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers (Debian trixie's libonnxruntime-dev, 1.21) into $1.
# No pip wheel ships them; they are never committed. Uses apt-get with a private sources list, so
# nothing on the system changes. Prints the include folder on success.
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
suite=${SQLLM_ORT_DEB_SUITE:-trixie}
mirror=${SQLLM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: '$tool' not found; set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h" >&2; exit 1; }
done
[ -f "$keyring" ] || { echo "fetch_ort_headers: $keyring is missing (apt-get install debian-archive-keyring), or set ORT_INCLUDE_DIR" >&2; exit 1; }
work="$dest/apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [signed-by=$keyring] $mirror $suite main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root
      -o Debug::NoLocking=1 -o APT::Architecture=amd64 -o APT::Architectures=amd64)
apt-get "${opts[@]}" -qq update >&2 || { echo "fetch_ort_headers: apt-get update from $mirror ($suite) failed (offline?); set ORT_INCLUDE_DIR" >&2; exit 1; }
(cd "$work" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2) || { echo "fetch_ort_headers: downloading libonnxruntime-dev failed; set ORT_INCLUDE_DIR" >&2; exit 1; }
dpkg -x "$work"/libonnxruntime-dev_*.deb "$dest/root"
rm -rf "$work"
inc="$dest/root/usr/include/onnxruntime"
[ -f "$inc/onnxruntime_cxx_api.h" ] || { echo "fetch_ort_headers: the package had no onnxruntime_cxx_api.h" >&2; exit 1; }
echo "$inc"
