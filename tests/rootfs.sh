#!/usr/bin/env bash
# Builds minimal root filesystems from Debian's packages, for the tests that run the
# worker wrapper inside foreign userlands on the simulated node:
#   .tools/rootfs/busybox   busybox-static alone: no libc, no NSS files, no CA store
#   .tools/rootfs/musl      the musl C library (its loader, no glibc) and busybox-static
# Each holds /bin/busybox with its applets linked, and nothing else: no /etc/passwd,
# /etc/nsswitch.conf, /etc/ssl, HOME or writable state. A root filesystem already built
# from the same package versions is kept. Works with CI=true and no stdin.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$PWD/.tools/rootfs"
mkdir -p "$OUT"
log() { printf 'rootfs: %s\n' "$*"; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# download PACKAGE...: the .deb files into $tmp/debs (package lists fetched once if needed).
download() {
  mkdir -p "$tmp/debs"
  if ! (cd "$tmp/debs" && apt-get download -qq "$@" </dev/null >/dev/null 2>&1); then
    apt-get update -qq </dev/null >/dev/null
    (cd "$tmp/debs" && apt-get download -qq "$@" </dev/null >/dev/null)
  fi
}

# build NAME PACKAGE...: unpacks the packages into $OUT/NAME with busybox's applets.
build() {
  local name="$1"
  shift
  local want
  want="$(apt-cache policy "$@" 2>/dev/null | awk '/Candidate:/ {print $2}' | tr '\n' ' ')"
  if [ -x "$OUT/$name/bin/busybox" ] && [ "$(cat "$OUT/$name/.packages" 2>/dev/null)" = "$* $want" ]; then
    log "$name already in $OUT/$name"
    return 0
  fi
  log "building $name from $*"
  rm -rf "$tmp/debs" "$OUT/$name"
  download "$@"
  mkdir -p "$OUT/$name"
  for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$OUT/$name"
  done
  # Only what the packages put in place: drop their docs.
  rm -rf "$OUT/$name/usr/share"
  mkdir -p "$OUT/$name/bin" "$OUT/$name/tmp"
  chmod 1777 "$OUT/$name/tmp"
  local applet
  for applet in $("$OUT/$name/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$OUT/$name/bin/$applet"
  done
  printf '%s' "$* $want" >"$OUT/$name/.packages"
  log "$name: $(find "$OUT/$name" -type f | wc -l) files"
}

build busybox busybox-static
build musl busybox-static musl
