# The oonode image, built with no registry access: no base image, nothing pulled.
#
# Its build context is target/oonode-image/, staged by testnet/docker-build.sh: the
# host-built binary, the shared libraries `ldd` lists for it, the dynamic loader, and a
# few files under /etc. Build it with:
#
#   testnet/docker-build.sh                  # cargo build --release + stage + this build
#   docker build -t oonode:local target/oonode-image   # the same, once staged
#
# On a machine that can pull images, deploy/Dockerfile.multistage builds from source in a
# rust image instead (see deploy/README.md).
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin \
    HOME=/data \
    RUST_LOG=info
# The co_dir (key, host.yaml, sessions) of a node: mount a volume on /data to keep it
# (docker-compose.yml gives each node a named volume; the relay keeps no state).
WORKDIR /data
# HTTP (oonode host), relay (oonode relay), swarm (TCP and QUIC, when listened on).
EXPOSE 8000 8765 4001 4001/udp
ENTRYPOINT ["/usr/local/bin/oonode"]
CMD ["--help"]
