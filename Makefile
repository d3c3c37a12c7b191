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

deps:
	ci/install-deps.sh

build:
	$(CARGO) build --workspace --release

agent:
	$(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-agent

guest-image: agent
	guest/build-image.sh $(AGENT_BIN) $(GUEST_DIR)

demo: guest-image
	$(CARGO) run --release -q -p podvisor-guest -- demo

test: lint test-unit test-guest

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-unit:
	$(CARGO) test --workspace --lib --bins

test-guest: guest-image
	$(CARGO) test -p podvisor-guest --test agent

bench: guest-image
	$(CARGO) run --release -q -p podvisor-guest -- bench

clean:
	$(CARGO) clean
	rm -rf build
