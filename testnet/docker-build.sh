#!/usr/bin/env bash
# Builds the oonode image with no registry access: compiles on the host, stages the
# binary with the shared libraries it links (found by ldd) and the dynamic loader into
# target/oonode-image/, and builds the top-level Dockerfile (FROM scratch) on it.
#
#   testnet/docker-build.sh              # cargo build --release, then the image oonode:local
#   testnet/docker-build.sh --debug      # package the debug build (what `cargo test` built)
#   testnet/docker-build.sh --stage-only # stage target/oonode-image/ but build no image
#                                        # (`docker compose build` builds it from there)
#   OONODE_IMAGE=name:tag testnet/docker-build.sh
#
# On a machine that can pull images, deploy/Dockerfile.multistage builds from source
# instead (see deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build_image=1
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    --release) profile=release ;;
    --stage-only) build_image=0 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "docker-build.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
image="${OONODE_IMAGE:-oonode:local}"
target_dir="${CARGO_TARGET_DIR:-target}"

if [ "$profile" = release ]; then
  echo "== cargo build --release"
  cargo build --release --bin oonode
else
  echo "== cargo build (debug)"
  cargo build --bin oonode
fi
bin="$target_dir/$profile/oonode"
[ -x "$bin" ] || { echo "docker-build.sh: $bin was not built" >&2; exit 1; }

ctx=target/oonode-image
root="$ctx/rootfs"
echo "== staging $bin and its libraries in $ctx"
rm -rf "$ctx"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/data" "$root/tmp"
chmod 1777 "$root/tmp"
if [ "$profile" = debug ]; then
  # Debug info only makes the image big; the symbols stay for backtraces.
  objcopy --strip-debug "$bin" "$root/usr/local/bin/oonode"
else
  cp "$bin" "$root/usr/local/bin/oonode"
fi

# Every shared library the binary loads, and the loader itself (the PT_INTERP path), each
# copied (symlinks resolved) to the path the binary looks for it at.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
if [ -z "$libs" ]; then
  echo "docker-build.sh: ldd found no libraries; is $bin dynamically linked?" >&2
  exit 1
fi
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  echo "   $lib"
done
# Name resolution (service names on the compose networks) through /etc/hosts and DNS;
# glibc 2.34+ has both built in, so no libnss_*.so is needed.
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/data:/usr/local/bin/oonode\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
cp Dockerfile "$ctx/Dockerfile"
du -sh "$root" | awk '{ print "   rootfs: " $1 }'

if [ "$build_image" = 1 ]; then
  echo "== docker build -t $image (FROM scratch: nothing is pulled)"
  docker build -q -t "$image" "$ctx"
  docker image ls "$image"
fi
