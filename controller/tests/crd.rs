//! The committed CRD YAML (crds/ and the chart's copy) is what the Rust
//! types generate; regenerate with `make crds` when this fails.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::Path;

#[test]
fn committed_crds_are_current() {
    let want = podvisor_controller::crd_yaml().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "crds/virtualmachines.podvisor.io.yaml",
        "charts/podvisor/crds/virtualmachines.podvisor.io.yaml",
    ] {
        let have = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(
            have == want,
            "{file} is stale: run `make crds` (podvisor-controller crd) and commit it"
        );
    }
}
