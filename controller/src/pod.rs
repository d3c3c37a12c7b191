//! The Pod that runs a `VirtualMachine`: runtime class podvisor, the VM's
//! size and hypervisor as the shim's allow-listed `podvisor.io/*`
//! annotations, its memory and a share of its vCPUs as resource requests
//! for the scheduler, and an owner reference back to the VirtualMachine.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, Pod,
    PodSpec, ResourceRequirements, SecretVolumeSource, Volume as PodVolume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{RunStrategy, VirtualMachine};

/// The pod label naming its VirtualMachine.
pub const LABEL_VM: &str = "podvisor.io/vm";
/// The pod label carrying the restarts of the pods it replaced.
pub const LABEL_RESTARTS_BEFORE: &str = "podvisor.io/restarts-before";
/// The pod label with a hash of what the spec made of it (spec and
/// annotations), to tell when the VM's spec has changed since.
pub const LABEL_TEMPLATE_HASH: &str = "podvisor.io/template-hash";
/// The VM's container in its pod.
pub const CONTAINER: &str = "vm";

// The shim's annotations; the node's podvisor config must allow them (the
// Helm chart's node config does).
use podvisor_names::annotations::{
    HYPERVISOR as ANNOTATION_HYPERVISOR, KERNEL_PARAMS as ANNOTATION_KERNEL_PARAMS,
    MEMORY_MIB as ANNOTATION_MEMORY, VCPUS as ANNOTATION_VCPUS,
};
use podvisor_names::RUNTIME_CLASS;

/// The smallest guest the shim boots.
const MIN_MEMORY_MIB: u64 = podvisor_names::MIN_GUEST_MEMORY_MIB as u64;

/// What this cluster's nodes allow a VM (the chart passes the same values to
/// the node config and to the controller), and how much CPU the scheduler
/// reserves for one.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_cpus: u32,
    pub max_memory_mib: u64,
    /// vCPUs per requested CPU (KubeVirt's cpuAllocationRatio; 10 there
    /// too): a 1-vCPU VM requests 100m. 1 reserves a whole CPU per vCPU.
    pub cpu_allocation_ratio: u32,
}

/// A valid VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cpus: u32,
    pub memory_mib: u64,
    /// The pod's CPU request.
    pub cpu_request_millis: u64,
}

/// Why a VirtualMachine's spec cannot become a pod.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("cpus: {0} is more than this cluster's maximum of {1}")]
    TooManyCpus(u32, u32),
    #[error("memory: {0:?} is not a quantity of bytes (such as 512Mi or 2Gi)")]
    BadMemory(String),
    #[error("memory: {0} MiB is outside {MIN_MEMORY_MIB}..={1} MiB")]
    MemoryOutOfRange(u64, u64),
}

/// A Kubernetes quantity of bytes, rounded up to whole MiB.
pub fn memory_mib(q: &Quantity) -> Result<u64, SpecError> {
    let bad = || SpecError::BadMemory(q.0.clone());
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bytes = n * factor;
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        return Err(bad());
    }
    // In 0..=1e18 as checked above: the cast neither truncates nor wraps.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let mib = (bytes / (1024.0 * 1024.0)).ceil() as u64;
    Ok(mib)
}

/// Checks the spec against `limits`; returns the VM's size.
pub fn validate(vm: &VirtualMachine, limits: Limits) -> Result<Size, SpecError> {
    let cpus = vm.spec.cpus;
    if cpus > limits.max_cpus {
        return Err(SpecError::TooManyCpus(cpus, limits.max_cpus));
    }
    let memory_mib = memory_mib(&vm.spec.memory)?;
    if !(MIN_MEMORY_MIB..=limits.max_memory_mib).contains(&memory_mib) {
        return Err(SpecError::MemoryOutOfRange(
            memory_mib,
            limits.max_memory_mib,
        ));
    }
    Ok(Size {
        cpus,
        memory_mib,
        cpu_request_millis: (u64::from(cpus) * 1000)
            .div_ceil(u64::from(limits.cpu_allocation_ratio.max(1))),
    })
}

/// The pod for `vm` of `size` (as `validate` returned it), as a first
/// start makes it ([`replacing`] makes it a replacement).
pub fn build(vm: &VirtualMachine, size: Size) -> Pod {
    let spec = &vm.spec;
    let memory_mib = size.memory_mib;
    let mut annotations = BTreeMap::from([
        (ANNOTATION_VCPUS.to_string(), spec.cpus.to_string()),
        (ANNOTATION_MEMORY.to_string(), memory_mib.to_string()),
    ]);
    if let Some(p) = spec.kernel_params.as_ref().filter(|p| !p.is_empty()) {
        annotations.insert(ANNOTATION_KERNEL_PARAMS.to_string(), p.clone());
    }
    if let Some(h) = spec.hypervisor {
        annotations.insert(ANNOTATION_HYPERVISOR.to_string(), h.as_str().to_string());
    }
    let labels = BTreeMap::from([
        (LABEL_VM.to_string(), vm.name_any()),
        (LABEL_RESTARTS_BEFORE.to_string(), "0".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "podvisor-controller".to_string(),
        ),
    ]);
    // Requests only: the scheduler reserves the VM's memory and a share of
    // its vCPUs, and without limits the shim adds nothing to the size the
    // annotations give.
    let requests = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{}m", size.cpu_request_millis)),
        ),
        ("memory".to_string(), Quantity(format!("{memory_mib}Mi"))),
    ]);
    let (volumes, mounts) = spec
        .volumes
        .iter()
        .map(|v| {
            let mut pv = PodVolume {
                name: v.name.clone(),
                ..Default::default()
            };
            if let Some(name) = &v.config_map {
                pv.config_map = Some(ConfigMapVolumeSource {
                    name: name.clone(),
                    ..Default::default()
                });
            } else if let Some(name) = &v.secret {
                pv.secret = Some(SecretVolumeSource {
                    secret_name: Some(name.clone()),
                    ..Default::default()
                });
            } else if let Some(claim) = &v.persistent_volume_claim {
                pv.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(v.read_only),
                });
            } else {
                pv.empty_dir = Some(EmptyDirVolumeSource {
                    size_limit: v.empty_dir.as_ref().and_then(|e| e.size_limit.clone()),
                    ..Default::default()
                });
            }
            let mount = VolumeMount {
                name: v.name.clone(),
                mount_path: v.mount_path.clone(),
                read_only: v.read_only.then_some(true),
                ..Default::default()
            };
            (pv, mount)
        })
        .unzip::<_, _, Vec<_>, Vec<_>>();
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(vm.name_any()),
            namespace: vm.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: vm.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            runtime_class_name: Some(RUNTIME_CLASS.to_string()),
            restart_policy: Some(restart_policy(spec.run_strategy).to_string()),
            containers: vec![Container {
                name: CONTAINER.to_string(),
                image: Some(spec.image.clone()),
                image_pull_policy: Some("IfNotPresent".to_string()),
                command: non_empty(&spec.command),
                args: non_empty(&spec.args),
                env: (!spec.env.is_empty()).then(|| spec.env.clone()),
                ports: (!spec.ports.is_empty()).then(|| spec.ports.clone()),
                resources: Some(ResourceRequirements {
                    requests: Some(requests),
                    ..Default::default()
                }),
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                ..Default::default()
            }],
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        }),
        status: None,
    };
    let hash = template_hash(&pod);
    if let Some(labels) = pod.metadata.labels.as_mut() {
        labels.insert(LABEL_TEMPLATE_HASH.to_string(), hash);
    }
    pod
}

/// `pod` as the replacement of pods that restarted `restarts_before` times
/// in all (a label, outside the template hash).
pub fn replacing(mut pod: Pod, restarts_before: i32) -> Pod {
    if let Some(labels) = pod.metadata.labels.as_mut() {
        labels.insert(
            LABEL_RESTARTS_BEFORE.to_string(),
            restarts_before.to_string(),
        );
    }
    pod
}

/// FNV-1a of the pod's spec and annotations as JSON: stable across builds
/// and controller versions that make the same pod.
pub fn template_hash(pod: &Pod) -> String {
    let json = serde_json::to_vec(&(&pod.spec, &pod.metadata.annotations)).unwrap_or_default();
    let hash = json.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}

/// Whether `pod` was made from a spec other than the one `desired` is.
pub fn outdated(pod: &Pod, desired: &Pod) -> bool {
    let label = |p: &Pod| p.labels().get(LABEL_TEMPLATE_HASH).cloned();
    label(pod) != label(desired)
}

/// The kubelet restarts the workload inside its VM where the strategy asks
/// for it; the controller replaces the pod when the kubelet cannot.
pub fn restart_policy(strategy: RunStrategy) -> &'static str {
    match strategy {
        RunStrategy::Always | RunStrategy::Halted => "Always",
        RunStrategy::RerunOnFailure => "OnFailure",
        RunStrategy::Once => "Never",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Hypervisor, VirtualMachineSpec, Volume};

    fn vm(spec: serde_json::Value) -> VirtualMachine {
        let spec: VirtualMachineSpec = serde_json::from_value(spec).unwrap();
        let mut vm = VirtualMachine::new("web", spec);
        vm.metadata.namespace = Some("ns".into());
        vm.metadata.uid = Some("uid-1".into());
        vm
    }

    const LIMITS: Limits = Limits {
        max_cpus: 4,
        max_memory_mib: 4096,
        cpu_allocation_ratio: 10,
    };

    fn size(cpus: u32, memory_mib: u64) -> Size {
        Size {
            cpus,
            memory_mib,
            cpu_request_millis: u64::from(cpus) * 100,
        }
    }

    #[test]
    fn quantities_round_up_to_mib() {
        let q = |s: &str| memory_mib(&Quantity(s.into()));
        assert_eq!(q("512Mi"), Ok(512));
        assert_eq!(q("2Gi"), Ok(2048));
        assert_eq!(q("1.5Gi"), Ok(1536));
        assert_eq!(q("1G"), Ok(954));
        assert_eq!(q("1048577"), Ok(2));
        assert_eq!(q("300000Ki"), Ok(293));
        for bad in ["", "Mi", "12Q", "-1Gi", "1e3", "1..2Mi", "9999999999999Ti"] {
            assert!(q(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let ok = vm(serde_json::json!({"image": "busybox", "cpus": 4, "memory": "4Gi"}));
        assert_eq!(validate(&ok, LIMITS), Ok(size(4, 4096)));
        let whole = Limits {
            cpu_allocation_ratio: 1,
            ..LIMITS
        };
        assert_eq!(validate(&ok, whole).map(|s| s.cpu_request_millis), Ok(4000));
        let three = Limits {
            cpu_allocation_ratio: 3,
            ..LIMITS
        };
        assert_eq!(validate(&ok, three).map(|s| s.cpu_request_millis), Ok(1334));
        let cpus = vm(serde_json::json!({"image": "busybox", "cpus": 5}));
        assert_eq!(validate(&cpus, LIMITS), Err(SpecError::TooManyCpus(5, 4)));
        let big = vm(serde_json::json!({"image": "busybox", "memory": "5Gi"}));
        assert_eq!(
            validate(&big, LIMITS),
            Err(SpecError::MemoryOutOfRange(5120, 4096))
        );
        let small = vm(serde_json::json!({"image": "busybox", "memory": "64Mi"}));
        assert!(validate(&small, LIMITS).is_err());
        let garbage = vm(serde_json::json!({"image": "busybox", "memory": "lots"}));
        let e = validate(&garbage, LIMITS).unwrap_err();
        assert!(e.to_string().contains("\"lots\""), "{e}");
    }

    #[test]
    fn defaults_are_one_cpu_512_mib_always() {
        let v = vm(serde_json::json!({"image": "busybox"}));
        assert_eq!(v.spec.cpus, 1);
        assert_eq!(validate(&v, LIMITS), Ok(size(1, 512)));
        assert_eq!(v.spec.run_strategy, RunStrategy::Always);
        assert_eq!(v.spec.hypervisor, None);
    }

    #[test]
    fn pod_carries_runtime_class_size_and_owner() {
        let mut v = vm(serde_json::json!({
            "image": "busybox", "command": ["sh", "-c"], "args": ["sleep 1"],
            "cpus": 2, "memory": "1Gi", "kernelParams": "quiet",
            "hypervisor": "qemu", "runStrategy": "RerunOnFailure",
            "env": [{"name": "A", "value": "1"}],
            "ports": [{"containerPort": 80}],
        }));
        v.spec.volumes.push(Volume {
            name: "cfg".into(),
            mount_path: "/etc/app".into(),
            read_only: true,
            config_map: Some("app".into()),
            secret: None,
            persistent_volume_claim: None,
            empty_dir: None,
        });
        let pod = replacing(build(&v, size(2, 1024)), 3);
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("web"));
        assert_eq!(meta.namespace.as_deref(), Some("ns"));
        let ann = meta.annotations.as_ref().unwrap();
        assert_eq!(ann[ANNOTATION_VCPUS], "2");
        assert_eq!(ann[ANNOTATION_MEMORY], "1024");
        assert_eq!(ann[ANNOTATION_KERNEL_PARAMS], "quiet");
        assert_eq!(ann[ANNOTATION_HYPERVISOR], Hypervisor::Qemu.as_str());
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_VM], "web");
        assert_eq!(labels[LABEL_RESTARTS_BEFORE], "3");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("VirtualMachine", "uid-1", Some(true))
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("podvisor"));
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let c = &spec.containers[0];
        assert_eq!(
            c.command.as_deref(),
            Some(&["sh".to_string(), "-c".into()][..])
        );
        assert_eq!(c.args.as_deref(), Some(&["sleep 1".to_string()][..]));
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(req["cpu"].0, "200m");
        assert_eq!(req["memory"].0, "1024Mi");
        assert!(c.resources.as_ref().unwrap().limits.is_none());
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/etc/app");
        let vol = &spec.volumes.unwrap()[0];
        assert_eq!(vol.config_map.as_ref().unwrap().name, "app");
    }

    #[test]
    fn unset_optional_settings_add_no_annotations() {
        let pod = build(&vm(serde_json::json!({"image": "busybox"})), size(1, 512));
        let ann = pod.metadata.annotations.unwrap();
        assert_eq!(ann.len(), 2, "{ann:?}");
        let c = &pod.spec.unwrap().containers[0];
        assert!(c.command.is_none() && c.args.is_none() && c.env.is_none());
    }

    #[test]
    fn template_hash_follows_the_spec_not_the_restarts() {
        let v = vm(serde_json::json!({"image": "busybox"}));
        let a = build(&v, size(1, 512));
        assert!(!outdated(&replacing(build(&v, size(1, 512)), 7), &a));
        assert!(outdated(&build(&v, size(1, 640)), &a));
        let mut w = v.clone();
        w.spec.kernel_params = Some("quiet".into());
        assert!(outdated(&build(&w, size(1, 512)), &a));
        assert_eq!(a.metadata.labels.unwrap()[LABEL_TEMPLATE_HASH].len(), 16);
    }

    #[test]
    fn restart_policy_follows_strategy() {
        assert_eq!(restart_policy(RunStrategy::Always), "Always");
        assert_eq!(restart_policy(RunStrategy::RerunOnFailure), "OnFailure");
        assert_eq!(restart_policy(RunStrategy::Once), "Never");
    }
}
