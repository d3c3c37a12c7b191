//! The checks each request passes before the agent acts on it, run alone:
//! decoding what the request carries (an OCI spec, an exec's process,
//! resources, a network plan, DNS settings) and planning what it asks,
//! with no effect on the guest. Each wraps the functions the agent's call
//! runs before it acts (`SandboxSetup::from_request`, the network plan,
//! `SpecPlan::new`, `exec_plan`, `resource_update`, `signal_number`); the
//! fuzz target `agent_request` (`fuzz/`) drives them with any bytes, and
//! each answer is a plan or an error naming the bad field, never a panic.

use std::path::{Path, PathBuf};

use podvisor_protocol::api;

use crate::container::rootfs::secure_join;
use crate::container::{exec_plan, resource_update, user, validate_id, SpecPlan};
use crate::error::Result;
pub use crate::sandbox::SandboxSetup;
use crate::sandbox::{pod_tmpfs_plan, signal_number};

/// The rootfs under which [`create_container`] joins a spec's mount
/// destinations: no such directory exists, so no symlink bends the join.
pub const NO_ROOT: &str = "/nonexistent/podvisor-check";

/// CreateSandbox: the hostname, resolv.conf and sysctl names.
pub fn create_sandbox(req: &api::CreateSandboxRequest) -> Result<SandboxSetup> {
    SandboxSetup::from_request(req)
}

/// ConfigureNetwork: every interface, address, route and neighbour.
pub fn configure_network(req: &api::ConfigureNetworkRequest) -> Result<()> {
    crate::network::plan(req).map(drop)
}

/// CreateContainer: the id, the pod tmpfs volumes and the OCI spec
/// (process, seccomp filter, sysctls, namespaces, cgroup files). With no rootfs a user name is
/// refused and nothing is read from the guest's disk. The answer is where
/// each mount would land in a rootfs at [`NO_ROOT`], as the container's
/// setup joins it.
pub fn create_container(req: &api::CreateContainerRequest) -> Result<Vec<PathBuf>> {
    let id = req.container_id.as_str();
    validate_id("container", id)?;
    for v in &req.tmpfs {
        pod_tmpfs_plan(v)?;
    }
    let terminal = req.stdio.as_ref().is_some_and(|s| s.terminal);
    let spec = SpecPlan::parse(id, &req.oci_spec_json)?;
    let plan = SpecPlan::new(id, spec, None, terminal, &|_| None)?;
    Ok(plan
        .spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| secure_join(Path::new(NO_ROOT), m.destination()))
        .collect())
}

/// ExecProcess: the ids and the process.
pub fn exec_process(req: &api::ExecProcessRequest) -> Result<()> {
    validate_id("container", &req.container_id)?;
    validate_id("exec", &req.exec_id)?;
    let terminal = req.stdio.as_ref().is_some_and(|s| s.terminal);
    exec_plan(&req.exec_id, &req.process_json, None, terminal).map(drop)
}

/// UpdateContainer: the resources as cgroup files.
pub fn update_container(req: &api::UpdateContainerRequest) -> Result<()> {
    resource_update(&req.container_id, &req.resources_json).map(drop)
}

/// SignalProcess: the signal number.
pub fn signal_process(req: &api::SignalProcessRequest) -> Result<()> {
    signal_number(req.signal).map(drop)
}

/// A user name looked up in a container's `/etc/passwd` and `/etc/group`
/// (the image's files): its uid, gid and supplementary groups.
pub fn user_in_image(passwd: &str, group: &str, name: &str) -> Result<(u32, u32, Vec<u32>)> {
    user::resolve_in(passwd, group, name).map(|u| (u.uid, u.gid, u.groups))
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::*;

    /// A seed of the fuzz target: its selector byte and payload.
    fn seed(name: &str) -> (u8, Vec<u8>) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/agent_request")
            .join(name);
        let data = std::fs::read(&path).unwrap();
        (data[0], data[1..].to_vec())
    }

    #[test]
    fn every_seed_of_the_fuzz_target_is_a_valid_request() {
        // Seeds that pass every check lead the fuzzer through all of them.
        let (_, p) = seed("create_sandbox");
        let setup =
            create_sandbox(&api::CreateSandboxRequest::parse_from_bytes(&p).unwrap()).unwrap();
        assert_eq!(setup.hostname.as_deref(), Some("my-pod"));
        assert_eq!(
            setup.resolv_conf,
            "nameserver 10.96.0.10\nnameserver fd00::10\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        let (_, p) = seed("configure_network");
        configure_network(&api::ConfigureNetworkRequest::parse_from_bytes(&p).unwrap()).unwrap();
        let (_, p) = seed("create_container");
        let mounts =
            create_container(&api::CreateContainerRequest::parse_from_bytes(&p).unwrap()).unwrap();
        // "/data/../../etc/x" stays inside.
        assert_eq!(mounts[3], Path::new(NO_ROOT).join("etc/x"));
        let (_, p) = seed("exec_process");
        exec_process(&api::ExecProcessRequest::parse_from_bytes(&p).unwrap()).unwrap();
        let (_, p) = seed("signal_process");
        signal_process(&api::SignalProcessRequest::parse_from_bytes(&p).unwrap()).unwrap();
        let (_, p) = seed("spec_json");
        create_container(&api::CreateContainerRequest {
            container_id: "c".into(),
            oci_spec_json: p,
            ..Default::default()
        })
        .unwrap();
        let (_, p) = seed("resources_json");
        update_container(&api::UpdateContainerRequest {
            container_id: "c".into(),
            resources_json: p,
            ..Default::default()
        })
        .unwrap();
        let (_, p) = seed("user");
        let text = String::from_utf8(p).unwrap();
        let f: Vec<&str> = text.split('\0').collect();
        assert_eq!(
            user_in_image(f[0], f[1], f[2]).unwrap(),
            (1000, 1000, vec![10])
        );
    }

    #[test]
    fn sandbox_settings_that_would_break_a_line_are_refused() {
        let req = |f: &dyn Fn(&mut api::CreateSandboxRequest)| {
            let mut r = api::CreateSandboxRequest::new();
            f(&mut r);
            create_sandbox(&r).map(|s| s.resolv_conf)
        };
        let e = req(&|r| r.dns_searches = vec!["a\nnameserver 6.6.6.6".into()]).unwrap_err();
        assert!(e.to_string().contains("DNS search domain"), "{e}");
        let e = req(&|r| r.dns_options = vec![String::new()]).unwrap_err();
        assert!(e.to_string().contains("DNS option"), "{e}");
        let e = req(&|r| r.hostname = "a b".into()).unwrap_err();
        assert!(e.to_string().contains("hostname \"a b\""), "{e}");
        assert!(req(&|r| r.hostname = "h".repeat(65)).is_err());
        assert!(req(&|r| r.dns_servers = vec!["8.8.8.8 ".into()]).is_err());
        assert_eq!(req(&|r| r.hostname = "h".repeat(64)).unwrap(), "");
    }

    #[test]
    fn a_bad_signal_and_a_terminal_mismatch_are_named() {
        for n in [0, 65, u32::MAX] {
            let r = api::SignalProcessRequest {
                signal: n,
                ..Default::default()
            };
            assert!(signal_process(&r)
                .unwrap_err()
                .to_string()
                .contains(&n.to_string()));
        }
        let (_, p) = seed("exec_process");
        let mut r = api::ExecProcessRequest::parse_from_bytes(&p).unwrap();
        r.stdio.mut_or_insert_default().terminal = true;
        let e = exec_process(&r).unwrap_err();
        assert!(e.to_string().contains("terminal"), "{e}");
    }
}
