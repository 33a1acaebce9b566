#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the tests from published Go modules:
#   kube-apiserver, kube-controller-manager, kube-scheduler  (module k8s.io/kubernetes)
#   etcd                                                     (module go.etcd.io/etcd/server/v3)
# into target/control-plane/bin/ at the repository root, whatever the current directory
# (into $CARGO_TARGET_DIR/control-plane/bin/ when CARGO_TARGET_DIR is set, as Cargo's own
# output goes there then).
#
# Usage:
#   bash tests/control-plane/build.sh                 default versions (below), from the
#                                                     committed go.mod/go.sum files
#   KUBE_VERSION=v1.36.3 bash tests/control-plane/build.sh
#                                                     another served k8s.io/kubernetes version
#   ETCD_VERSION=v3.6.16 bash tests/control-plane/build.sh
#                                                     another served go.etcd.io/etcd/server/v3 version
#   FORCE=1 bash tests/control-plane/build.sh         rebuild even if the binaries are current
#   bash tests/control-plane/build.sh --regenerate    rewrite the committed go.mod/go.sum files
#                                                     for DEFAULT_KUBE_VERSION/DEFAULT_ETCD_VERSION
#                                                     (after changing them below), then build
#
# A non-default version is built from a go.mod generated under target/control-plane/work/
# (k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local
# directories; a consuming module must replace each one with its published v0.<minor>.<patch>).
# A version that needs a newer Go than the installed one: also set GOTOOLCHAIN=go1.27.3 (say).
#
# It is a no-op when target/control-plane/bin/.stamp records the same versions, Go version
# and hashes of this script and the committed go.mod/go.sum files.
# Environment: GO (go command, default go), NICE (niceness of the builds, default 19).
# Runs unattended (CI=true, no stdin); needs only Go and the Go module proxy.
set -euo pipefail

DEFAULT_KUBE_VERSION=v1.37.2
DEFAULT_ETCD_VERSION=v3.7.3
MODULE_PATH=testrunner-operator/tests/control-plane
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$PWD/$TARGET_DIR
OUT=$TARGET_DIR/control-plane
BIN=$OUT/bin
STAMP=$BIN/.stamp
GO=${GO:-go}
NICE=${NICE:-19}

REGENERATE=0
case "${1:-}" in
  "") ;;
  --regenerate) REGENERATE=1 ;;
  *) echo "usage: [KUBE_VERSION=v1.X.Y] [ETCD_VERSION=v3.X.Y] [FORCE=1] $0 [--regenerate]" >&2; exit 2 ;;
esac

KUBE_VERSION=${KUBE_VERSION:-$DEFAULT_KUBE_VERSION}
ETCD_VERSION=${ETCD_VERSION:-$DEFAULT_ETCD_VERSION}
if [[ $REGENERATE == 1 ]]; then
  KUBE_VERSION=$DEFAULT_KUBE_VERSION
  ETCD_VERSION=$DEFAULT_ETCD_VERSION
fi
semver_re='^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?$'
[[ $KUBE_VERSION =~ $semver_re && $KUBE_VERSION == v1.* ]] || { echo "KUBE_VERSION must look like v1.37.2, not '$KUBE_VERSION'" >&2; exit 2; }
[[ $ETCD_VERSION =~ $semver_re && $ETCD_VERSION == v3.* ]] || { echo "ETCD_VERSION must look like v3.7.3, not '$ETCD_VERSION'" >&2; exit 2; }

# Reproducible Go settings: no workspace, no cgo (Kubernetes builds these binaries static),
# no user-wide GOFLAGS.
export GOWORK=off CGO_ENABLED=0 GOFLAGS=
unset GOOS GOARCH

log() { printf '[control-plane %s] %s\n' "$(date +%T)" "$*" >&2; }

stamp_text() {
  printf 'kubernetes %s\netcd %s\ngo %s\ntoolchain %s\n' \
    "$KUBE_VERSION" "$ETCD_VERSION" "$(cd "$HERE" && "$GO" env GOVERSION)" "${GOTOOLCHAIN:-}"
  (cd "$HERE" && sha256sum build.sh go.mod go.sum etcd/go.mod etcd/go.sum)
}

binaries_present() {
  local b
  for b in "${KUBE_CMDS[@]}" etcd; do [[ -x $BIN/$b ]] || return 1; done
}

up_to_date() {
  [[ $REGENERATE == 0 && -z ${FORCE:-} ]] && binaries_present && [[ -f $STAMP ]] \
    && [[ "$(stamp_text)" == "$(cat "$STAMP")" ]]
}

# ---- fast path: nothing to do -------------------------------------------------------------
if up_to_date; then
  log "up to date: Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION in $BIN"
  exit 0
fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
if up_to_date; then # built by a concurrent run
  log "up to date: Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION in $BIN"
  exit 0
fi

# ---- go.mod generation ----------------------------------------------------------------------
# The value of a string field of `go mod download -json` output (stdin); no jq needed.
json_field() {
  sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" | head -n 1
}

# The modules that the go.mod file $1 both requires and replaces with a ./staging/ directory.
staging_modules() {
  "$GO" mod edit -fmt -print "$1" | awk '
    /^require \($/ { blk = "require"; next }
    /^replace \($/ { blk = "replace"; next }
    /^\)$/          { blk = ""; next }
    /^require /     { req[$2] = 1; next }
    /^replace /     { rep_line(2); next }
    blk == "require" { req[$1] = 1 }
    blk == "replace" { rep_line(1) }
    function rep_line(first,   i) {
      for (i = first; i < NF; i++)
        if ($i == "=>") { if ($(i + 1) ~ /^\.\/staging\//) staged[$first] = 1; return }
    }
    END { for (m in staged) if (m in req) print m }' | LC_ALL=C sort
}

# Writes go.mod/go.sum in $1 for k8s.io/kubernetes $2: requires it, replaces every staging
# module it requires with the published v0.<minor>.<patch>, and lists the three commands as
# tools (so that `go mod tidy` keeps exactly what they need).
gen_kube_module() {
  local dir=$1 version=$2 staging_version=v0.${2#v1.} info gomod godebug mod cmd
  mkdir -p "$dir"
  rm -f "$dir/go.mod" "$dir/go.sum"
  info=$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$version") || true
  gomod=$(json_field GoMod <<<"$info")
  [[ -f $gomod ]] || { echo "k8s.io/kubernetes@$version: $(json_field Error <<<"$info")" >&2; exit 1; }
  godebug=$("$GO" mod edit -fmt -print "$gomod" | grep '^godebug ' || true)
  {
    printf '%s\n' \
      "// Generated by build.sh for k8s.io/kubernetes $version; do not edit by hand." \
      "// Builds kube-apiserver, kube-controller-manager and kube-scheduler (see docs/control-plane.md)." \
      "" "module $MODULE_PATH" "" "go 1.26.0" ""
    # Kubernetes' own GODEBUG defaults (only the main module's godebug lines count).
    [[ -z $godebug ]] || printf '%s\n' "$godebug" ""
    printf '%s\n' "require k8s.io/kubernetes $version" "" \
      "// Kubernetes' staging modules, which its own go.mod takes from ./staging/src/k8s.io/." \
      "replace ("
    # Staging modules: replaced with ./staging/... in Kubernetes' go.mod and required by it.
    while read -r mod; do
      printf '\t%s => %s %s\n' "$mod" "$mod" "$staging_version"
    done < <(staging_modules "$gomod")
    printf ')\n\ntool (\n'
    for cmd in "${KUBE_CMDS[@]}"; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$cmd"; done
    printf ')\n'
  } >"$dir/go.mod"
  (cd "$dir" && "$GO" mod tidy)
}

# Writes go.mod/go.sum in $1 for go.etcd.io/etcd/server/v3 $2 (its root package is the etcd
# command). A module of its own, so that etcd's dependencies are not raised to Kubernetes'.
gen_etcd_module() {
  local dir=$1 version=$2
  mkdir -p "$dir"
  rm -f "$dir/go.mod" "$dir/go.sum"
  printf '%s\n' \
    "// Generated by build.sh for go.etcd.io/etcd/server/v3 $version; do not edit by hand." \
    "// Builds the etcd server (see docs/control-plane.md)." \
    "" "module $MODULE_PATH/etcd" "" "go 1.26.0" >"$dir/go.mod"
  (cd "$dir" && "$GO" mod edit "-require=go.etcd.io/etcd/server/v3@$version" \
    -tool=go.etcd.io/etcd/server/v3 && "$GO" mod tidy)
}

if [[ $REGENERATE == 1 ]]; then
  log "regenerating $HERE/go.mod for Kubernetes $KUBE_VERSION"
  gen_kube_module "$HERE" "$KUBE_VERSION"
  log "regenerating $HERE/etcd/go.mod for etcd $ETCD_VERSION"
  gen_etcd_module "$HERE/etcd" "$ETCD_VERSION"
fi

if [[ $KUBE_VERSION == "$DEFAULT_KUBE_VERSION" ]]; then
  KUBE_MOD=$HERE
else
  KUBE_MOD=$OUT/work/kubernetes-$KUBE_VERSION
  if ! grep -qsF "for k8s.io/kubernetes $KUBE_VERSION;" "$KUBE_MOD/go.mod" || [[ ! -s $KUBE_MOD/go.sum ]]; then
    log "generating $KUBE_MOD/go.mod for Kubernetes $KUBE_VERSION"
    gen_kube_module "$KUBE_MOD" "$KUBE_VERSION"
  fi
fi
if [[ $ETCD_VERSION == "$DEFAULT_ETCD_VERSION" ]]; then
  ETCD_MOD=$HERE/etcd
else
  ETCD_MOD=$OUT/work/etcd-$ETCD_VERSION
  if ! grep -qsF "for go.etcd.io/etcd/server/v3 $ETCD_VERSION;" "$ETCD_MOD/go.mod" || [[ ! -s $ETCD_MOD/go.sum ]]; then
    log "generating $ETCD_MOD/go.mod for etcd $ETCD_VERSION"
    gen_etcd_module "$ETCD_MOD" "$ETCD_VERSION"
  fi
fi

# ---- build ----------------------------------------------------------------------------------
TMP=$OUT/bin.tmp
rm -rf "$TMP"
mkdir -p "$TMP"

# Version stamping as Kubernetes' hack/lib/version.sh does; the build date is the module's
# publication time, so that two builds of one version are identical.
kube_time=$(cd "$KUBE_MOD" && "$GO" list -mod=readonly -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
minor=${KUBE_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$kube_time"
done

build_flags=(-mod=readonly -trimpath -buildvcs=false)
log "downloading modules (verified against go.sum)"
(cd "$KUBE_MOD" && "$GO" mod download)
(cd "$ETCD_MOD" && "$GO" mod download)

log "building ${KUBE_CMDS[*]} $KUBE_VERSION with $("$GO" env GOVERSION) (this takes a while)"
pkgs=()
for c in "${KUBE_CMDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
(cd "$KUBE_MOD" && nice -n "$NICE" "$GO" build "${build_flags[@]}" -ldflags "$ldflags" -o "$TMP/" "${pkgs[@]}")

log "building etcd $ETCD_VERSION"
(cd "$ETCD_MOD" && nice -n "$NICE" "$GO" build "${build_flags[@]}" -ldflags "-s -w" -o "$TMP/etcd" go.etcd.io/etcd/server/v3)

"$TMP/kube-apiserver" --version >&2
"$TMP/etcd" --version >&2

mkdir -p "$BIN"
rm -f "$STAMP"
for b in "${KUBE_CMDS[@]}" etcd; do mv -f "$TMP/$b" "$BIN/$b"; done
rmdir "$TMP"
stamp_text >"$STAMP"
log "done: $(cd "$BIN" && ls -1 | tr '\n' ' ')in $BIN"
