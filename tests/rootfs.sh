#!/usr/bin/env bash
# Builds minimal root filesystems from Debian's packages, for the tests that run the
# worker wrapper inside foreign userlands on the simulated node:
#   .tools/rootfs/busybox   busybox-static alone: no libc, no NSS files, no CA store
#   .tools/rootfs/musl      the musl C library (its loader, no glibc) and busybox-static
#   .tools/rootfs/debian11  Debian 11 "bullseye" (glibc 2.31, older than this machine's),
#                           minbase, by debootstrap (installed from Debian's packages)
# The first two hold /bin/busybox with its applets linked, and nothing else: no
# /etc/passwd, /etc/nsswitch.conf, /etc/ssl, HOME or writable state. Each root has a
# marker file /.testrunner-rootfs naming it, so a test can tell it from the host's root.
# A root already built from the same packages is kept. Works with CI=true and no stdin;
# debootstrap needs root.
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
  if [ -e "$OUT/$name/.testrunner-rootfs" ] && [ "$(cat "$OUT/$name/.packages" 2>/dev/null)" = "$* $want" ]; then
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
  printf '%s' "$name" >"$OUT/$name/.testrunner-rootfs"
  printf '%s' "$* $want" >"$OUT/$name/.packages"
  log "$name: $(find "$OUT/$name" -type f | wc -l) files"
}

# debian NAME SUITE: a minbase Debian root of an older release, by debootstrap.
debian() {
  local name="$1" suite="$2"
  if [ -e "$OUT/$name/.testrunner-rootfs" ]; then
    log "$name already in $OUT/$name"
    return 0
  fi
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap </dev/null >/dev/null; then
      apt-get update -qq </dev/null >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap </dev/null >/dev/null
    fi
  fi
  log "building $name: Debian $suite (minbase)"
  rm -rf "$OUT/$name.tmp"
  debootstrap --variant=minbase "$suite" "$OUT/$name.tmp" http://deb.debian.org/debian </dev/null >"$tmp/debootstrap.log" 2>&1 ||
    { tail -n 20 "$tmp/debootstrap.log" >&2; exit 1; }
  rm -rf "$OUT/$name.tmp/var/cache/apt/archives"/*.deb "$OUT/$name.tmp/usr/share/doc" "$OUT/$name.tmp/usr/share/man"
  printf '%s' "$name" >"$OUT/$name.tmp/.testrunner-rootfs"
  rm -rf "$OUT/$name"
  mv "$OUT/$name.tmp" "$OUT/$name"
  log "$name: glibc $(ls "$OUT/$name"/lib/x86_64-linux-gnu/libc-*.so 2>/dev/null | sed 's/.*libc-//; s/\.so//')"
}

build busybox busybox-static
build musl busybox-static musl
debian debian11 bullseye
