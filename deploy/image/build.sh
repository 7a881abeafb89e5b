#!/usr/bin/env bash
# Builds the custody OCI image from Debian 12 packages and this build's binaries, with no
# registry pulls: mmdebstrap extracts (no maintainer scripts, so no shell is needed or
# installed) exactly the Debian packages that own the shared libraries custodyd and custodyctl
# load, plus SoftHSM2's library for the embedded default, from the Debian mirror this machine's
# apt uses; the binaries go to /usr/bin, a user custody (10001) owns /var/lib/custody; then
# buildah commits the root filesystem as an image (entrypoint custodyd, user 10001).
#
# usage: deploy/image/build.sh BUILD_DIR OUT_DIR [TAG]
#   writes OUT_DIR/rootfs.tar (the image's filesystem) and, when buildah is installed, commits
#   TAG (default custody:0.1.0) to the local container storage and writes OUT_DIR/custody.oci.tar
#   (an OCI archive: `podman load -i`, `skopeo copy oci-archive:... docker://REGISTRY/...`).
# MIRROR overrides the Debian mirror (default: the first URIs: of /etc/apt/sources.list.d).
set -euo pipefail
BUILD_DIR=$(realpath "$1")
OUT=$2
TAG=${3:-custody:0.1.0}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
BINS=("$BUILD_DIR/bin/custodyd" "$BUILD_DIR/bin/custodyctl")

# The runtime packages: the owners of every library the binaries load (ldd), found under /usr
# too (Debian 12 registers merged-/usr files under either path).
owner() {
  local p=$1
  for candidate in "$p" "/usr$p" "$(readlink -f "$p")" "/usr$(readlink -f "$p")"; do
    dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1 && return 0
  done
  echo "build.sh: no Debian package owns $p" >&2
  return 1
}
PACKAGES=(libsofthsm2)  # the embedded default's token (custodyd dlopens it)
# custody's own shared libraries (libcustody_proto: the one registration of custody.v1's protobuf
# types) are copied from the build, under their sonames, into the multiarch library directory.
OWN_LIBS=$(mktemp -d)
trap 'rm -rf "$OWN_LIBS"' EXIT
OWN=()
LIBDIR=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for lib in $(for b in "${BINS[@]}"; do ldd "$b" | awk '/=> \//{print $3}'; done | sort -u); do
  case "$lib" in
    "$BUILD_DIR"/*) cp -L "$lib" "$OWN_LIBS/$(basename "$lib")" && OWN+=("$OWN_LIBS/$(basename "$lib")") ;;
    *) PACKAGES+=("$(owner "$lib")") ;;
  esac
done
PACKAGES=($(printf '%s\n' "${PACKAGES[@]}" | sort -u))

# The mirror apt uses here (deb822 sources or a sources.list line).
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$MIRROR" ] || MIRROR=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
fi
SECURITY=${SECURITY_MIRROR:-$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep security | head -1)}
SOURCES=("deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main")
[ -n "$SECURITY" ] && SOURCES+=("deb $SECURITY bookworm-security main")

echo "custody image: ${PACKAGES[*]} from $MIRROR" >&2
mmdebstrap --quiet --variant=extract --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --extract-hook='mkdir -p "$1/usr/bin" "$1/etc" "$1/var/lib/custody" "$1/tmp" "$1/run"' \
  --extract-hook="copy-in ${BINS[*]} /usr/bin" \
  --extract-hook="mkdir -p \"\$1$LIBDIR\"" \
  --extract-hook="copy-in ${OWN[*]} $LIBDIR" \
  --extract-hook='strip --strip-unneeded "$1/usr/bin/custodyd" "$1/usr/bin/custodyctl"' \
  --extract-hook='printf "root:x:0:0:root:/root:/usr/sbin/nologin\ncustody:x:10001:10001:custody:/var/lib/custody:/usr/sbin/nologin\n" > "$1/etc/passwd"' \
  --extract-hook='printf "root:x:0:\ncustody:x:10001:\n" > "$1/etc/group"' \
  --extract-hook='chown 10001:10001 "$1/var/lib/custody" && chmod 0700 "$1/var/lib/custody" && chmod 1777 "$1/tmp"' \
  --extract-hook='rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/lintian" "$1/var/cache/apt" "$1/var/lib/apt/lists"' \
  bookworm "$OUT/rootfs.tar" "${SOURCES[@]}"

if command -v buildah >/dev/null 2>&1; then
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$OUT/rootfs.tar" / >/dev/null
  buildah config --user 10001:10001 --workingdir /var/lib/custody \
    --entrypoint '["/usr/bin/custodyd"]' --cmd '["--state_dir=/var/lib/custody"]' \
    --port 8443 --port 9464 --volume /var/lib/custody \
    --label org.opencontainers.image.title=custody \
    --label org.opencontainers.image.description="custodyd and custodyctl on Debian 12 packages" \
    "$ctr"
  buildah rmi "$TAG" >/dev/null 2>&1 || true  # the previous build's image, not kept dangling
  buildah commit --quiet --rm "$ctr" "$TAG" >/dev/null
  rm -f "$OUT/custody.oci.tar"
  buildah push --quiet "$TAG" "oci-archive:$OUT/custody.oci.tar:$TAG"
  echo "custody image: $TAG committed; $(buildah images --format '{{.Size}}' "$TAG" | head -1)" \
    "uncompressed; OCI archive $(du -h "$OUT/custody.oci.tar" | cut -f1)" >&2
fi
echo "custody image: rootfs $(du -h "$OUT/rootfs.tar" | cut -f1)" >&2
