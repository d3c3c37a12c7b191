# podvisor: build, install, guest image, tests, benchmarks. `make help` lists targets.

# CARGO, AGENT_TARGET, BUILD_DEB_PACKAGES and deps-build: what building
# needs, on its own for the Dockerfile's builder.
include deps.mk
.DEFAULT_GOAL := help
AGENT_BIN    := target/$(AGENT_TARGET)/release/podvisor-agent
GUEST_DIR    := build/guest
KERNEL_DIR   := build/kernel
# podvisor (our kernel, guest/kernel/) or debian (Debian's cloud kernel).
GUEST_KERNEL ?= podvisor
export GUEST_KERNEL
PREFIX       ?= /opt/podvisor
CONFIG_DIR   ?= /etc/podvisor

# What running and testing it adds: QEMU (+ virtiofsd in qemu-system-common,
# SeaBIOS), containerd 1.6 and the CNI plugins; openssl, curl and iptables
# for the local Kubernetes cluster (cluster/up.sh) and port forwarding;
# docker-registry for critest's images (make test-cri); buildah, umoci,
# skopeo and debootstrap for the images (make images).
DEB_PACKAGES := $(BUILD_DEB_PACKAGES) qemu-system-x86 qemu-system-common seabios \
                containerd containernetworking-plugins iproute2 bsdutils openssl curl \
                iptables docker-registry strace buildah umoci skopeo debootstrap
CARGO_FUZZ_VERSION := 0.13.2
# The fuzz targets' builds (nightly, sanitizers), kept across runs.
FUZZ_TARGET_DIR := /var/cache/podvisor/fuzz-target
# The images the chart runs on the local cluster (cluster/up.sh imports
# build/cluster/images/*.tar): the Dockerfile's own (make images).
VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/podvisor/Chart.yaml)
CONTROLLER_IMAGE := docker.io/podvisor/controller:$(VERSION)
NODE_IMAGE := docker.io/podvisor/node:$(VERSION)
# ring's C code for the musl target.
export CC_x86_64_unknown_linux_musl := musl-gcc
SHELL        := /bin/bash

# Tests and tools find vhost-device-vsock here (and crictl, critest and
# containerd 2.x in build/upstream/, where upstream/build.sh links them).
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: images test-images guest-image-debian test-guest-kernel test-vmm-linux test-guest-debian help deps build agent guest-kernel guest-image shim install uninstall demo bench \
        test lint test-unit test-vmm test-security test-guest test-containerd test-network test-warm \
        test-cri upstream cluster-up cluster-down cluster-tools test-e2e e2e-kind clean \
        static crds test-controller vmm-test-hooks fuzz test-fuzz soak test-soak

help:
	@echo "make deps             install what the build and tests need (as root; deps-build: the build only)"
	@echo "make build            build the workspace (release)"
	@echo "make guest-kernel     podvisor's guest kernel from Debian's linux-source-6.12 (cached)"
	@echo "make guest-image      the guest image (kernel + initramfs) in $(GUEST_DIR)/ (GUEST_KERNEL=debian: Debian's)"
	@echo "make install          install the shim, guest image and config under $(PREFIX), $(CONFIG_DIR)"
	@echo "make demo             start a private containerd and run a container in a VM"
	@echo "make images           the Dockerfiles' images, built with buildah, as OCI archives in build/images/"
	@echo "make test-images      those images in containerd 2.x: each entrypoint run, the node trees and kind's config checked"
	@echo "make test             lint, unit tests, VMM, guest, containerd, network, CRI, e2e, image and controller tests"
	@echo "make test-cri         critest (CRI validation) for podvisor beside runc, containerd 1.6 and 2.x"
	@echo "make upstream         Kubernetes, Helm, containerd 2.x and cri-tools from the Go module proxy (cached)"
	@echo "make cluster-up       a local single-node Kubernetes cluster with podvisor (cluster-down stops it)"
	@echo "make test-e2e         cluster-up, the e2e suite, cluster-down"
	@echo "make e2e-kind         the e2e suite on a kind cluster (needs Docker and kind)"
	@echo "make test-controller  the Dockerfile's images, installer, Helm chart, VirtualMachine controller on the local cluster"
	@echo "make crds             regenerate crds/ and the chart's CRDs from controller/src/crd.rs"
	@echo "make bench            print the figures of DESIGN.md that can be measured here"
	@echo "make soak             SOAK_CYCLES (200) CRI pods through their life cycle, 4 at a time; leaks, cycles/min, p50/p99"
	@echo "make fuzz             every fuzz target for FUZZ_SECONDS (300) each"

deps: deps-build
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEB_PACKAGES)
	rustup component add rustfmt clippy
	command -v cargo-fuzz >/dev/null || \
	  $(CARGO) install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

build:
	$(CARGO) build --workspace --release

agent:
	$(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-agent

# Built once per source version and fragment, in the cache outside the
# checkout (guest/kernel/build.sh), linked as $(KERNEL_DIR).
guest-kernel:
	guest/kernel/build.sh $(KERNEL_DIR)

guest-image: agent $(if $(filter podvisor,$(GUEST_KERNEL)),guest-kernel)
	guest/build-image.sh $(AGENT_BIN) $(GUEST_DIR)

# Debian's cloud kernel beside it (test-guest-debian, bench).
guest-image-debian: agent
	GUEST_KERNEL=debian guest/build-image.sh $(AGENT_BIN) build/guest-debian

# The shim and the in-tree VMM it starts.
shim:
	$(CARGO) build --release -p podvisor-shim -p podvisor-vmm

# The layout DESIGN.md names; containerd finds the shim through /usr/local/bin.
install: shim guest-image
	install -D -m 0755 target/release/containerd-shim-podvisor-v2 $(PREFIX)/bin/containerd-shim-podvisor-v2
	install -D -m 0755 target/release/podvisor-vmm $(PREFIX)/bin/podvisor-vmm
	install -D -m 0755 $$(command -v vhost-device-vsock) $(PREFIX)/bin/vhost-device-vsock
	install -D -m 0644 $(GUEST_DIR)/kernel $(PREFIX)/share/guest/kernel
	if [ -f $(GUEST_DIR)/vmlinux ]; then install -D -m 0644 $(GUEST_DIR)/vmlinux $(PREFIX)/share/guest/vmlinux; \
	else rm -f $(PREFIX)/share/guest/vmlinux; fi
	install -D -m 0644 $(GUEST_DIR)/initramfs $(PREFIX)/share/guest/initramfs
	install -D -m 0644 $(GUEST_DIR)/manifest $(PREFIX)/share/guest/manifest
	ln -sf $(PREFIX)/bin/containerd-shim-podvisor-v2 /usr/local/bin/containerd-shim-podvisor-v2
	[ -f $(CONFIG_DIR)/config.toml ] || install -D -m 0644 shim/config.toml $(CONFIG_DIR)/config.toml

uninstall:
	rm -f /usr/local/bin/containerd-shim-podvisor-v2
	rm -rf $(PREFIX)
	@echo "left $(CONFIG_DIR)/config.toml in place"

demo: deps shim guest-image
	upstream/build.sh containerd
	$(CARGO) run --release -q -p podvisor-tools -- demo

# The figures measurable without Kubernetes (the guest kernel: ours beside
# Debian's), critest's tallies, then pods
# through the local cluster (create to Running, delete to gone; podvisor
# beside runc).
bench: shim guest-image guest-image-debian install upstream cluster-tools
	$(CARGO) run --release -q -p podvisor-tools -- bench
	$(CARGO) build --release -p podvisor-e2e --bins
	cluster/with.sh target/release/podvisor-pod-bench

# Every fuzz target (fuzz/: the VMM's virtio-mmio devices as a guest drives
# them, the hybrid-vsock CONNECT line, the agent's requests, the shim's
# config and annotations)
# for FUZZ_SECONDS each; executions and crashes per target (fuzz/run.sh).
FUZZ_SECONDS ?= 300
fuzz:
	FUZZ_TARGET_DIR=$(FUZZ_TARGET_DIR) fuzz/run.sh $(FUZZ_SECONDS)

# A short run of each, in `make test`.
test-fuzz:
	FUZZ_TARGET_DIR=$(FUZZ_TARGET_DIR) fuzz/run.sh 20

# The soak under containerd 2.x's CRI (networked pods): SOAK_CYCLES pods
# through RunPodSandbox, create/start/exec/stop/remove of a container,
# StopPodSandbox and RemovePodSandbox, 4 in flight; then no process,
# mount, netns, link, qdisc, filter, cgroup or /run/podvisor entry of
# theirs, containerd lists nothing, and its descriptors and RSS stayed
# within their bounds. Prints cycles per minute and p50/p99 sandbox start.
SOAK_CYCLES ?= 200
soak: guest-image
	upstream/build.sh containerd cri-tools
	$(CARGO) build -p podvisor-shim --bins
	PODVISOR_SOAK_CYCLES=$(SOAK_CYCLES) $(CARGO) test -p podvisor-testkit --test containerd -- soak_

# A short soak, in `make test`.
test-soak:
	$(MAKE) --no-print-directory soak SOAK_CYCLES=20

# test-controller last: it ends with the node installer's uninstall.
test: lint test-unit test-fuzz test-guest-kernel test-vmm test-vmm-linux test-security test-guest test-guest-debian test-containerd test-network test-warm test-soak test-cri test-e2e test-images test-controller

# Crates only the VMM may link: the shim and the hypervisor layer know
# nothing of KVM ioctls (they run podvisor-vmm, and its probe, as programs).
VMM_ONLY_CRATES := kvm-ioctls kvm-bindings vhost virtio-queue linux-loader acpi_tables

lint:
	$(CARGO) fmt --all -- --check
	rustfmt --edition 2021 --check fuzz/fuzz_targets/*.rs
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@for p in podvisor-shim podvisor-hypervisor; do \
	  bad=$$($(CARGO) tree -p $$p -e normal --prefix none | awk '{print $$1}' | sort -u | grep -xF $(VMM_ONLY_CRATES:%=-e %)); \
	  if [ -n "$$bad" ]; then echo "lint: $$p links VMM-only crates:" $$bad; exit 1; fi; \
	done; echo "lint: podvisor-shim and podvisor-hypervisor link none of $(VMM_ONLY_CRATES)"

test-unit:
	$(CARGO) test --workspace --lib --bins

# Small guests under /dev/kvm (any KVM, even nested), then the guest image
# on the VMM (only where KVM runs guest code at hardware speed).
test-vmm: guest-image
	$(CARGO) test -p podvisor-vmm --features test-hooks --test kvm_guests
	$(CARGO) build -p podvisor-vmm --bins
	$(CARGO) test -p podvisor-testkit --test vmm

# The host-side confinement of a VM's processes, checked from outside: a
# QEMU VM and its helpers, the in-tree VMM's threads, and a VMM killed by
# its seccomp filter (a copy built with the test-only hook, beside the
# real one).
test-security: guest-image vmm-test-hooks
	PODVISOR_VMM_HOOKS=$(VMM_HOOKS) $(CARGO) test -p podvisor-testkit --test security

# podvisor-vmm with the test-only hook (a forbidden call on demand), a
# copy beside the real one, which is rebuilt after it.
VMM_HOOKS := $(CURDIR)/target/debug/podvisor-vmm-test-hooks
vmm-test-hooks:
	$(CARGO) build -p podvisor-vmm --bins --features test-hooks
	cp target/debug/podvisor-vmm $(VMM_HOOKS)
	$(CARGO) build -p podvisor-vmm --bins

test-guest: guest-image
	$(CARGO) test -p podvisor-testkit --test agent

# Debian's stock kernel keeps working: its image (modules loaded at boot
# and on demand) through the same agent suite.
test-guest-debian: guest-image-debian
	PODVISOR_GUEST_DIR=$(CURDIR)/build/guest-debian $(CARGO) test -p podvisor-testkit --test agent

# Every option the fragments ask for is in the resolved configs, and the
# check fails (naming it) when one is dropped.
test-guest-kernel: guest-kernel
	guest/kernel/check-config.sh $(KERNEL_DIR)/config guest/kernel/podvisor.config
	guest/kernel/check-config.sh $(KERNEL_DIR)/emulated/config guest/kernel/podvisor.config guest/kernel/emulated.config
	@dropped=$$(mktemp); grep -v '^CONFIG_VIRTIO_VSOCKETS=' $(KERNEL_DIR)/config > $$dropped; \
	if guest/kernel/check-config.sh $$dropped guest/kernel/podvisor.config 2>$$dropped.err; then \
	  echo "check-config passed a config without CONFIG_VIRTIO_VSOCKETS"; rm -f $$dropped $$dropped.err; exit 1; fi; \
	grep -q 'CONFIG_VIRTIO_VSOCKETS: fragment wants' $$dropped.err || { cat $$dropped.err; exit 1; }; \
	rm -f $$dropped $$dropped.err; echo "check-config: a dropped CONFIG_VIRTIO_VSOCKETS fails, named"

# podvisor's kernel (its test-only `emulated` variant) booted by podvisor-vmm
# with 2 vCPUs and every device, read from its console, under the /dev/kvm
# there is (where KVM runs at hardware speed, test-vmm's full boot runs
# instead), the same boot saved half-way and resumed by another VMM; and
# the same kernel under QEMU TCG up to the agent. One at a time: two
# emulated boots side by side each take more than twice as long.
test-vmm-linux: guest-kernel guest-image
	$(CARGO) build -p podvisor-vmm --bins
	PODVISOR_KERNEL_DIR=$(CURDIR)/$(KERNEL_DIR) $(CARGO) test -p podvisor-testkit --test vmm_linux -- --test-threads=1

# The shim under Debian's containerd 1.6, then under 2.x (a pod's VMM
# killed by its seccomp filter: the copy built with the test-only hook).
test-containerd: guest-image vmm-test-hooks
	upstream/build.sh containerd cri-tools
	$(CARGO) build -p podvisor-shim --bins
	PODVISOR_VMM_HOOKS=$(VMM_HOOKS) $(CARGO) test -p podvisor-testkit --test containerd -- --skip network_ --skip warm_ --skip soak_

# Pod networking under containerd 2.x's CRI with Debian's CNI plugins
# (bridge, host-local, portmap, loopback): pod IP reachable, port-forward,
# tap/tc joins, no leftovers.
test-network: guest-image
	upstream/build.sh containerd cri-tools
	$(CARGO) build -p podvisor-shim --bins
	$(CARGO) test -p podvisor-testkit --test containerd -- network_

# Warm start under containerd 2.x: two clones of one template are distinct
# guests (kernel, RNG reseed, clock, hostname, IP, files); a changed input
# makes a new template; a damaged one is removed and the pod boots cold.
test-warm: guest-image
	upstream/build.sh containerd cri-tools
	$(CARGO) build -p podvisor-shim --bins
	$(CARGO) test -p podvisor-testkit --test containerd -- warm_

# critest for the runc handler (the baseline) and podvisor on containerd
# 1.6 and 2.x, images from a registry on loopback; fails when podvisor
# fails a spec runc passes, but those testkit/critest-by-design.toml lists.
test-cri: guest-image
	upstream/build.sh containerd cri-tools
	$(CARGO) build -p podvisor-shim --bins
	$(CARGO) test -p podvisor-testkit --test cri

# Kubernetes, Helm, containerd 2.x and cri-tools, built from the Go module
# proxy at the releases upstream/*/go.mod pin, cached outside the checkout.
upstream:
	upstream/build.sh

# A single-node cluster on this machine (no Docker): podvisor installed as
# on a node, then etcd, the control plane, containerd 2.x and kubelet.
cluster-up: install upstream cluster-tools
	cluster/up.sh

cluster-down:
	cluster/down.sh

# What cluster/up.sh makes the test image with: the image tool, and the
# suite's static UDP echo (busybox's nc has no UDP), which it adds as
# /bin/udp-echo.
cluster-tools:
	$(CARGO) build --release -p podvisor-tools
	$(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-e2e --bin podvisor-udp-echo

# The e2e suite on the local cluster; the cluster goes down whatever happens.
test-e2e: install upstream cluster-tools
	$(CARGO) build -p podvisor-e2e --tests
	cluster/with.sh $(CARGO) test -p podvisor-e2e --test e2e

# The Dockerfiles' images (controller, node; kind-node on the node image),
# built with buildah from local stand-ins of their base images, as OCI
# archives in build/images/.
images:
	images/build.sh

# Each image imported into a private containerd 2.x and its entrypoint run;
# the kind node's containerd config and tree checked.
test-images: images
	upstream/build.sh containerd
	$(CARGO) build -p podvisor-shim --bins
	$(CARGO) test -p podvisor-testkit --test images

# Static (musl) controller and installer, as the images ship them.
static:
	$(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-controller -p podvisor-installer

crds:
	$(CARGO) run -q -p podvisor-controller -- crd > crds/virtualmachines.podvisor.io.yaml
	cp crds/virtualmachines.podvisor.io.yaml charts/podvisor/crds/

# The control plane on the local cluster with the Dockerfile's images, from
# a node podvisor was never put on: `helm install` of charts/podvisor, whose
# installer DaemonSet (the node image) installs podvisor and restarts the
# cluster's containerd;
# VirtualMachines through the controller; `helm uninstall` leaves the node
# as it was. Before it, the installer's file and restart tests (containerd
# v2/v3 configs) and the CRD staleness test. make install puts podvisor
# back afterwards.
test-controller: install upstream images cluster-tools
	$(CARGO) test -p podvisor-installer -p podvisor-controller
	$(CARGO) build -p podvisor-e2e --tests
	mkdir -p build/cluster/images
	cp build/images/controller.tar build/images/node.tar build/cluster/images/
	rc=0; $(MAKE) --no-print-directory uninstall >/dev/null; \
	  PODVISOR_CLUSTER_BARE=1 PODVISOR_CONTROLLER_IMAGE=$(CONTROLLER_IMAGE) PODVISOR_NODE_IMAGE=$(NODE_IMAGE) \
	  PODVISOR_CONTAINERD_CONFIG=$(CURDIR)/build/cluster/run/containerd/config.toml \
	  PODVISOR_CONTAINERD_PID_FILE=$(CURDIR)/build/cluster/run/containerd/containerd.pid \
	  cluster/with.sh $(CARGO) test -p podvisor-e2e --test controller || rc=$$?; \
	$(MAKE) --no-print-directory install >/dev/null; exit $$rc

# The same suite on kind (Docker hosts): kind's node image with podvisor
# installed on it by the node image's installer (e2e/kind/), then the suite.
e2e-kind:
	e2e/kind/run.sh

clean:
	$(CARGO) clean
	rm -rf build
