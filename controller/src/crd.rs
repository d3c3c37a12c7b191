//! The `VirtualMachine` custom resource (`virtualmachines.podvisor.io`,
//! v1alpha1): what a user writes (spec) and what the controller reports
//! (status). The CRD YAML in `crds/` is generated from these types.

use k8s_openapi::api::core::v1::{ContainerPort, EnvVar};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A workload that runs in its own podvisor microVM. The controller keeps one
/// Pod (runtime class podvisor) for it while its run strategy says it runs.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "podvisor.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    shortname = "pvm",
    namespaced,
    status = "VirtualMachineStatus",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.printableStatus"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","jsonPath":".status.restarts"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".status.ip"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.runStrategy","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// Container image the VM runs.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Entrypoint; the image's when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments; the image's when empty and no command is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// vCPUs of the VM.
    #[serde(default = "default_cpus")]
    #[schemars(range(min = 1))]
    pub cpus: u32,
    /// Memory of the VM (a Kubernetes quantity, such as 512Mi or 2Gi).
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Appended to the guest kernel's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^\x00-\x1f\x7f]*$"))]
    pub kernel_params: Option<String>,
    /// The node's configured hypervisor when unset: auto, qemu or vmm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "hypervisor_schema")]
    pub hypervisor: Option<Hypervisor>,
    #[serde(default)]
    pub run_strategy: RunStrategy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

// Optional enums as structural schemas (a plain string enum; schemars'
// anyOf with null is not one).
fn string_enum(values: &[&str]) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": values })
}

fn hypervisor_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["auto", "qemu", "vmm"])
}

fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_enum(&["Pending", "Running", "Succeeded", "Failed", "Stopped"])
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> Quantity {
    Quantity("512Mi".into())
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// The in-tree VMM where KVM runs at hardware speed, else QEMU.
    Auto,
    Qemu,
    Vmm,
}

impl Hypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Auto => "auto",
            Hypervisor::Qemu => "qemu",
            Hypervisor::Vmm => "vmm",
        }
    }
}

/// When the VM runs (KubeVirt's names).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunStrategy {
    /// Always running: restarted whenever it stops.
    #[default]
    Always,
    /// Stopped; its pod is removed.
    Halted,
    /// Restarted when it fails; left stopped when it succeeds.
    RerunOnFailure,
    /// Runs once to completion and is not restarted.
    Once,
}

/// A volume mounted into the VM's container (shared into the guest).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.configMap), has(self.secret), has(self.persistentVolumeClaim), has(self.emptyDir)].exists_one(x, x)",
    "message": "a volume needs exactly one of configMap, secret, persistentVolumeClaim, emptyDir"
}]))]
pub struct Volume {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Name of a ConfigMap in the VM's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Name of a Secret in the VM's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of a PersistentVolumeClaim in the VM's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<String>,
    /// Scratch space that lives as long as the VM's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDir>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDir {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// What the controller observed, written by server-side apply.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// One word for `kubectl get pvm`: Starting, Running, Stopping, Stopped,
    /// Succeeded, Failed, InvalidSpec, or the pod's waiting reason
    /// (ErrImagePull, CrashLoopBackOff, Unschedulable, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<String>,
    /// Pending, Running, Succeeded, Failed or Stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The VM's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Restarts of the workload: in-VM restarts by the kubelet plus VMs the
    /// controller replaced.
    #[serde(default)]
    pub restarts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

/// A status condition (the shape of metav1.Condition).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
