//! Conversions between containerd's messages and the agent's: the
//! runtime options' `ConfigPath` (decoded by hand, so the shim needs no
//! generated runtime-options types) and the guest's container statistics
//! as cgroup v2 metrics.

use std::path::PathBuf;

use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use podvisor_protocol::api;

/// `ConfigPath` from containerd's runtime options
/// (runtimeoptions.v1.Options: type_url = 1, config_path = 2).
pub fn config_path(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return input
                .read_string()
                .ok()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
        }
        if input
            .skip_field(containerd_shim::protos::protobuf::rt::WireType::new(wire)?)
            .is_err()
        {
            return None;
        }
    }
    None
}

pub fn stats_to_metrics(s: &api::StatsContainerResponse) -> v2::Metrics {
    let cpu = s.cpu.clone().unwrap_or_default();
    let mem = s.memory.clone().unwrap_or_default();
    let pids = s.pids.clone().unwrap_or_default();
    v2::Metrics {
        cpu: Some(v2::CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(v2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        })
        .into(),
        memory_events: Some(v2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        })
        .into(),
        pids: Some(v2::PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, podvisor_names::RUNTIME_TYPE).unwrap();
            out.write_string(2, path).unwrap();
            out.write_bytes(3, b"").unwrap();
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_comes_from_runtime_options() {
        let a = options("runtimeoptions.v1.Options", "/etc/podvisor/alt.toml");
        assert_eq!(
            config_path(Some(&a)),
            Some(PathBuf::from("/etc/podvisor/alt.toml"))
        );
        let other = options("containerd.runc.v1.Options", "/x");
        assert_eq!(config_path(Some(&other)), None);
        assert_eq!(config_path(None), None);
        let garbage = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(config_path(Some(&garbage)), None);
    }

    #[test]
    fn metrics_carry_the_guest_figures() {
        let s = api::StatsContainerResponse {
            memory: Some(api::MemoryStats {
                usage_bytes: 10,
                limit_bytes: 20,
                oom_kill_events: 1,
                ..Default::default()
            })
            .into(),
            pids: Some(api::PidsStats {
                current: 2,
                limit: 5,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = stats_to_metrics(&s);
        assert_eq!(m.memory.usage, 10);
        assert_eq!(m.memory.usage_limit, 20);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 2);
    }
}
