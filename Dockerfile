# podvisor's images, from one builder stage that runs the same steps as a
# node does (`make deps-build`, `make install`) plus the static (musl)
# controller and installer (`make static`):
#   docker build --target controller -t docker.io/podvisor/controller:0.1.0 .
#   docker build --target node       -t docker.io/podvisor/node:0.1.0 .
# The Helm chart runs the controller image as its Deployment and the node
# image as its installer DaemonSet (which copies /opt/podvisor to each node).
# `make images` builds both with buildah (images/build.sh).

# The build's tools, from deps.mk alone: this stage outlives changes to the
# source.
FROM rust:1-bookworm AS toolchain
WORKDIR /src
COPY deps.mk ./
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && make -f deps.mk deps-build \
 && rm -rf /var/lib/apt/lists/*

FROM toolchain AS build
COPY . .
# Crates, cargo's target directory and the guest kernel (keyed by its
# inputs) are cached between builds; what the images need is copied out.
RUN --mount=type=cache,id=podvisor-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=podvisor-target,target=/src/target \
    --mount=type=cache,id=podvisor-kernel,target=/var/cache/podvisor/kernel \
    make install static \
 && install -D -t /out target/x86_64-unknown-linux-musl/release/podvisor-controller \
      target/x86_64-unknown-linux-musl/release/podvisor-install

# The controller: one static binary, no shell, not root.
FROM gcr.io/distroless/static-debian12:nonroot AS controller
COPY --from=build /out/podvisor-controller /usr/local/bin/podvisor-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/podvisor-controller"]

# The node image: the installer and the tree `make install` made under
# /opt/podvisor (shim, VMM, vhost-device-vsock, guest kernel: bzImage and
# vmlinux, initramfs).
# Debian's nsenter (util-linux) restarts containerd in the host's namespaces.
FROM debian:bookworm-slim AS node
COPY --from=build /opt/podvisor /opt/podvisor
COPY --from=build /out/podvisor-install /usr/local/bin/podvisor-install
ENTRYPOINT ["/usr/local/bin/podvisor-install"]
