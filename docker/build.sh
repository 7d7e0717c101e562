#!/bin/sh
# Builds a static beacon binary and the `beacon:dev` image, offline.
#
#   docker/build.sh            # binary + image beacon:dev
#   docker/build.sh --binary   # only the static binary; prints its path
#   IMAGE=beacon:test docker/build.sh
#
# The binary links glibc statically (-C target-feature=+crt-static), so the
# image is `FROM scratch` with nothing but /beacon in it: nothing is pulled.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
image=${IMAGE:-beacon:dev}
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$root/target}

cd "$root"
# etcd-client compiles etcd's protobufs at build time: it needs protoc and
# the well-known types (google/protobuf/*.proto, in libprotobuf-dev, which
# --no-install-recommends leaves out).
if ! command -v protoc >/dev/null 2>&1 || [ ! -e /usr/include/google/protobuf/descriptor.proto ]; then
    echo "build.sh: installing protobuf-compiler and libprotobuf-dev (protoc)" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends protobuf-compiler libprotobuf-dev >/dev/null
fi
# --target keeps build scripts and proc macros dynamic (RUSTFLAGS only reach
# the target crates), and puts the static build in its own directory.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --offline --target "$target" --bin beacon
bin="$target_dir/$target/release/beacon"

# Static (or static-pie): no shared library is NEEDED.
if readelf -d "$bin" | grep -q NEEDED; then
    echo "build.sh: $bin needs shared libraries:" >&2
    readelf -d "$bin" | grep NEEDED >&2
    exit 1
fi

# The compose files give beacon (uid 65534) the socket's group.
if [ -S /var/run/docker.sock ]; then
    echo "DOCKER_GID=$(stat -c %g /var/run/docker.sock)" > "$here/.env"
fi

if [ "${1:-}" = "--binary" ]; then
    echo "$bin"
    exit 0
fi

# A context with only the binary and the Dockerfile: nothing else is sent.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Line tables help backtraces on the host; the image does not need them.
strip -o "$ctx/beacon" "$bin" 2>/dev/null || cp "$bin" "$ctx/beacon"
cp "$here/Dockerfile" "$ctx/Dockerfile"
docker build --quiet --tag "$image" "$ctx" >/dev/null
echo "build.sh: built $image ($(du -h "$ctx/beacon" | cut -f1) binary) from $bin" >&2
