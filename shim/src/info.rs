//! `containerd-shim-podvisor-v2 -info`: what containerd 2.x asks a runtime
//! before it uses it. The runtime options arrive on stdin (a protobuf
//! `Any`, possibly empty) and go back unchanged; the answer is a
//! `containerd.types.RuntimeInfo` on stdout, whose features (runtime-spec
//! `features.json`) tell the CRI what the guest can do, such as recursive
//! read-only mounts.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use podvisor_protocol::guest_features as g;
use serde_json::json;

use podvisor_names::RUNTIME_TYPE;

/// containerd registers runtime-spec's Features type under this URL.
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The runtime-spec features document of a podvisor guest.
pub fn features() -> serde_json::Value {
    let mount_options: Vec<&str> = g::MOUNT_OPTIONS
        .iter()
        .chain(g::RECURSIVE_MOUNT_OPTIONS.iter())
        .copied()
        .collect();
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.1",
        // Hooks name host binaries, which the guest cannot run.
        "hooks": [],
        "mountOptions": mount_options,
        "linux": {
            "namespaces": g::NAMESPACES,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": g::SECCOMP_ACTIONS,
                "operators": g::SECCOMP_OPERATORS,
                "archs": g::SECCOMP_ARCHES,
                "knownFlags": g::SECCOMP_FLAGS,
                "supportedFlags": g::SECCOMP_FLAGS,
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}},
        },
        "annotations": {
            "io.podvisor.isolation": "vm",
        },
    })
}

/// The RuntimeInfo answer for `options` (the bytes containerd wrote to
/// stdin: an encoded `Any`, or nothing).
pub fn runtime_info(options: &[u8]) -> Result<Vec<u8>, String> {
    let options = if options.is_empty() {
        MessageField::none()
    } else {
        MessageField::some(
            Any::parse_from_bytes(options)
                .map_err(|e| format!("runtime options on stdin are not a protobuf Any: {e}"))?,
        )
    };
    let features = serde_json::to_vec(&features()).map_err(|e| e.to_string())?;
    let info = RuntimeInfo {
        name: RUNTIME_TYPE.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        options,
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_string(),
            value: features,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_echoes_options_and_announces_rro() {
        let opts = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: b"\x12\x04/x.t".to_vec(),
            ..Default::default()
        };
        let out = runtime_info(&opts.write_to_bytes().unwrap()).unwrap();
        let info = RuntimeInfo::parse_from_bytes(&out).unwrap();
        assert_eq!(info.name, RUNTIME_TYPE);
        assert_eq!(info.options.type_url, "runtimeoptions.v1.Options");
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let f: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        let opts = f["mountOptions"].as_array().unwrap();
        assert!(opts.iter().any(|o| o == "rro"));
        assert!(!f["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "user"));
        let empty = RuntimeInfo::parse_from_bytes(&runtime_info(b"").unwrap()).unwrap();
        assert!(empty.options.is_none());
        assert!(runtime_info(b"\xff\xff").is_err());
    }
}
