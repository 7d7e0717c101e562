#!/bin/sh
# Builds an etcd image FROM scratch out of the host's etcd binary (Debian's
# etcd-server: /usr/bin/etcd) and every library `ldd` lists for it, at the
# same paths (the dynamic loader included). Nothing is pulled.
#
#   docker/etcd-image.sh TAG            # e.g. docker/etcd-image.sh beacon-etcd:dev
#   ETCD=/path/to/etcd docker/etcd-image.sh TAG
#
# The image's entrypoint is the binary; pass etcd's flags as the command.
set -eu

tag=${1:?usage: docker/etcd-image.sh TAG}
etcd=${ETCD:-$(command -v etcd || true)}
if [ -z "$etcd" ] || [ ! -x "$etcd" ]; then
    echo "etcd-image.sh: no etcd binary (install Debian's etcd-server, or set ETCD=)" >&2
    exit 1
fi
etcd=$(readlink -f "$etcd")

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/usr/bin"
cp "$etcd" "$ctx/root/usr/bin/etcd"

# A static binary: ldd says "not a dynamic executable" (or "statically
# linked") and exits non-zero; then the binary is all the image needs.
libs=$(ldd "$etcd" 2>/dev/null || true)
count=0
for lib in $(printf '%s\n' "$libs" | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }   # libc.so.6 => /lib/... (0x...)
    $1 ~ /^\// { print $1 }                        # /lib64/ld-linux-x86-64.so.2 (0x...)
'); do
    mkdir -p "$ctx/root$(dirname "$lib")"
    # -L: a symlinked path (/lib64/ld-linux-x86-64.so.2) becomes the file.
    cp -L "$lib" "$ctx/root$lib"
    count=$((count + 1))
done
if [ "$count" -eq 0 ] && readelf -d "$etcd" 2>/dev/null | grep -q NEEDED; then
    echo "etcd-image.sh: $etcd needs shared libraries but ldd listed none" >&2
    exit 1
fi

cat > "$ctx/Dockerfile" <<'EOF'
FROM scratch
COPY root/ /
ENTRYPOINT ["/usr/bin/etcd"]
EOF
docker build --quiet --tag "$tag" "$ctx" >/dev/null
echo "etcd-image.sh: built $tag from $etcd and $count libraries" >&2
