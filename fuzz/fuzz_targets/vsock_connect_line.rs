//! The hybrid-vsock `CONNECT <port>` line a host client sends the VMM
//! (`podvisor_vmm::devices::virtio::vsock::connect_port`): any bytes give
//! a port or none, never a panic; a port is only ever what the line spells.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::devices::virtio::vsock::connect_port;

fuzz_target!(|line: &[u8]| {
    if let Some(port) = connect_port(line) {
        let text = std::str::from_utf8(line).expect("a port from a line that is not UTF-8");
        assert!(text.trim().starts_with("CONNECT "), "{text:?}");
        assert_eq!(
            text.trim()["CONNECT ".len()..].trim().parse::<u32>().ok(),
            Some(port)
        );
    }
});
