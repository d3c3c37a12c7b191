//! The node's `config.toml` and a pod's annotations, as the shim reads
//! them (`podvisor_shim::config`): any text is a config or an error,
//! never a panic; a sizing that passes is within the node's bounds.
//!
//! Input: the config text, then after a NUL byte one annotation per line
//! (`key=value`).
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use podvisor_shim::config::Config;

fuzz_target!(|data: &[u8]| {
    let (config, annotations) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(config);
    let Ok(cfg) = Config::parse(Path::new("/fuzz/config.toml"), &text) else {
        return;
    };
    assert!(cfg.default_vcpus >= 1 && cfg.default_vcpus <= cfg.max_vcpus);
    let annotations: HashMap<String, String> = String::from_utf8_lossy(annotations)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(sizing) = cfg.vm_sizing(&annotations) {
        assert!(
            sizing.vcpus >= 1 && sizing.vcpus <= cfg.max_vcpus,
            "{sizing:?}"
        );
        assert!(sizing.memory_mib <= cfg.max_memory_mib, "{sizing:?}");
        let spec = cfg.vm_spec(&sizing, Path::new("/run/podvisor/fuzz"));
        assert_eq!(
            (spec.vcpus, spec.memory_mib),
            (sizing.vcpus, sizing.memory_mib)
        );
    }
});
