//! The agent's requests as the shim's bytes reach it (`podvisor_agent::
//! check`): each request's protobuf payload decoded, then what it
//! carries checked and planned as the agent does before acting: the OCI
//! spec (process, seccomp filter, sysctls, namespaces, cgroup files,
//! mount destinations), an exec's process, resources, the network plan,
//! the hostname and DNS settings, a signal; and a user name in an image's
//! /etc/passwd and /etc/group. Any bytes give a plan or an error, never a
//! panic; an accepted resolv.conf has one line per setting, and every
//! mount lands inside the rootfs.
//!
//! Input: byte 0 picks the request; the rest is its protobuf payload, or
//! for the JSON-carrying requests (3, 4, 5) the JSON alone, or for the
//! user lookup (6) `passwd NUL group NUL name`.
#![no_main]

use std::path::{Component, PathBuf};

use libfuzzer_sys::fuzz_target;
use podvisor_agent::check;
use podvisor_protocol::api;
use protobuf::Message;

fn mounts_stay_inside(mounts: &[PathBuf]) {
    for m in mounts {
        assert!(
            m.starts_with(check::NO_ROOT) && !m.components().any(|c| c == Component::ParentDir),
            "a mount lands outside the rootfs: {}",
            m.display()
        );
    }
}

fn decode<M: Message>(payload: &[u8]) -> Option<M> {
    M::parse_from_bytes(payload).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => {
            let Some(req) = decode::<api::CreateSandboxRequest>(payload) else {
                return;
            };
            if let Ok(setup) = check::create_sandbox(&req) {
                let lines = req.dns_servers.len()
                    + usize::from(!req.dns_searches.is_empty())
                    + usize::from(!req.dns_options.is_empty());
                assert_eq!(setup.resolv_conf.lines().count(), lines, "{setup:?}");
                if let Some(h) = &setup.hostname {
                    assert!(h.len() <= 64 && !h.contains(['\n', '\0']), "{h:?}");
                }
            }
        }
        1 => {
            if let Some(req) = decode::<api::ConfigureNetworkRequest>(payload) {
                let _ = check::configure_network(&req);
            }
        }
        2 => {
            if let Some(req) = decode::<api::CreateContainerRequest>(payload) {
                if let Ok(mounts) = check::create_container(&req) {
                    mounts_stay_inside(&mounts);
                }
            }
        }
        3 => {
            let req = api::CreateContainerRequest {
                container_id: "fuzz".into(),
                oci_spec_json: payload.to_vec(),
                ..Default::default()
            };
            if let Ok(mounts) = check::create_container(&req) {
                mounts_stay_inside(&mounts);
            }
        }
        4 => {
            let req = api::ExecProcessRequest {
                container_id: "fuzz".into(),
                exec_id: "exec".into(),
                process_json: payload.to_vec(),
                ..Default::default()
            };
            let _ = check::exec_process(&req);
        }
        5 => {
            let req = api::UpdateContainerRequest {
                container_id: "fuzz".into(),
                resources_json: payload.to_vec(),
                ..Default::default()
            };
            let _ = check::update_container(&req);
        }
        6 => {
            let text = String::from_utf8_lossy(payload);
            let mut parts = text.splitn(3, '\0');
            let (passwd, group, name) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let _ = check::user_in_image(passwd, group, name);
        }
        7 => {
            if let Some(req) = decode::<api::ExecProcessRequest>(payload) {
                let _ = check::exec_process(&req);
            }
        }
        _ => {
            if let Some(req) = decode::<api::SignalProcessRequest>(payload) {
                let _ = check::signal_process(&req);
            }
        }
    }
});
