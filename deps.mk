# What building podvisor needs, apart from the Makefile so that the
# Dockerfile's builder installs it in a layer of its own, which outlives
# changes to everything else: `make -f deps.mk deps-build` (the Makefile
# includes this file; `make deps` runs it first).

CARGO        ?= cargo
AGENT_TARGET := x86_64-unknown-linux-musl
VHOST_DEVICE_VSOCK_VERSION := 0.3.0

# Debian 12 packages. What building podvisor needs (the Dockerfile's
# builder installs only these): busybox-static, cpio, kmod, zstd and file
# for the guest image (binutils also for the VMM tests' small guests);
# linux-source-6.12 and its build tools for podvisor's
# guest kernel; musl-tools for the static agent, controller and installer
# (ring's C code for the musl target).
BUILD_DEB_PACKAGES := busybox-static cpio kmod zstd file ca-certificates binutils \
                      musl-tools linux-source-6.12 xz-utils make gcc flex bison bc \
                      libelf-dev patch

.PHONY: deps-build
deps-build:
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BUILD_DEB_PACKAGES)
	rustup target add $(AGENT_TARGET)
	command -v vhost-device-vsock >/dev/null || \
	  $(CARGO) install --locked vhost-device-vsock --version $(VHOST_DEVICE_VSOCK_VERSION)
