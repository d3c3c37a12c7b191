# podvisor: build, guest image, tests, benchmarks. `make help` lists targets.

CARGO        ?= cargo
AGENT_TARGET := x86_64-unknown-linux-musl
AGENT_BIN    := target/$(AGENT_TARGET)/release/podvisor-agent
GUEST_DIR    := build/guest

.PHONY: help deps build agent guest-image demo test lint test-unit test-guest bench clean

help:
	@echo "make deps         install what the build and tests need (Debian packages, Rust target, vhost-device-vsock)"
	@echo "make build        build the workspace"
	@echo "make guest-image  build the guest kernel + initramfs into $(GUEST_DIR)/"
	@echo "make demo         boot a guest VM and run a container in it"
	@echo "make test         lint, unit tests, guest tests"
	@echo "make test-guest   boot the guest under QEMU and run the agent tests"
	@echo "make bench        print the guest figures (boot to agent, agent RSS, image size)"

# Debian 12 packages: QEMU (+ virtiofsd in qemu-system-common, SeaBIOS),
# busybox-static for test rootfs, and the image build's tools.
DEB_PACKAGES := qemu-system-x86 qemu-system-common seabios busybox-static \
                cpio kmod zstd file ca-certificates
VHOST_DEVICE_VSOCK_VERSION := 0.3.0

deps:
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEB_PACKAGES)
	rustup target add $(AGENT_TARGET)
	rustup component add rustfmt clippy
	command -v vhost-device-vsock >/dev/null || [ -x $(HOME)/.cargo/bin/vhost-device-vsock ] || \
	  $(CARGO) install --locked vhost-device-vsock --version $(VHOST_DEVICE_VSOCK_VERSION)

build:
	$(CARGO) build --workspace --release

agent:
	$(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-agent

guest-image: agent
	guest/build-image.sh $(AGENT_BIN) $(GUEST_DIR)

demo: guest-image
	$(CARGO) run --release -q -p podvisor-testkit -- demo

test: lint test-unit test-guest

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-unit:
	$(CARGO) test --workspace --lib --bins

test-guest: guest-image
	$(CARGO) test -p podvisor-testkit --test agent

bench: guest-image
	$(CARGO) run --release -q -p podvisor-testkit -- bench

clean:
	$(CARGO) clean
	rm -rf build
