//! Warm start in the shim: whether a pod's VM is restored from the
//! template of its shape (built on first need) or boots cold, and why;
//! and `containerd-shim-podvisor-v2 template`, which builds the node's
//! template ahead of time.

use std::path::{Path, PathBuf};

use podvisor_hypervisor::{
    self as hypervisor, template, Hypervisor, HypervisorError, RunningVm, VmSpec,
};

use crate::config::{Config, VmSizing};

/// Restores a clone of the template for `spec` on `hv`, building the
/// template first if there is none. `Err` carries why the VM must boot
/// cold instead (logged by the caller); a template found corrupt is
/// removed, so the next pod rebuilds it.
pub async fn restore(
    config: &Config,
    sizing: &VmSizing,
    hv: &dyn Hypervisor,
    spec: &VmSpec,
) -> Result<RunningVm, String> {
    if !config.warm.templates {
        return Err("templates are off ([warm] templates = false)".into());
    }
    if sizing.kernel_params != config.kernel_params {
        return Err(
            "the pod sets its own kernel parameters (no template for a one-off command line)"
                .into(),
        );
    }
    let t = template::get_or_build(
        hv,
        hv.program(),
        spec,
        &config.warm.template_dir,
        config.warm.max_templates,
    )
    .await
    .map_err(|e| format!("no usable template: {e}"))?;
    match hv.restore(spec, &t).await {
        Ok(vm) => Ok(vm),
        Err(e @ HypervisorError::Template { .. }) => {
            if let Err(rm) = std::fs::remove_dir_all(&t.dir) {
                tracing::warn!("removing unusable template {}: {rm}", t.dir.display());
            }
            Err(format!(
                "template unusable, removed (the next VM rebuilds it): {e}"
            ))
        }
        Err(e) => Err(format!("restoring from template {}: {e}", t.dir.display())),
    }
}

/// `containerd-shim-podvisor-v2 template [--config PATH] [--vcpus N]
/// [--memory-mib N]`: builds (or finds) the template of the node's default
/// shape, or of the size given; prints its directory and manifest.
pub async fn cli(args: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (config, sizing) = shape_args(args)?;
    let (hv, why) = hypervisor::select(
        sizing.hypervisor,
        &config.paths,
        config.jail,
        Path::new(podvisor_names::paths::STATE_ROOT),
    )
    .await?;
    eprintln!("hypervisor: {why}");
    let spec = config.vm_spec(&sizing, &config.warm.template_dir);
    let t = template::get_or_build(
        &*hv,
        hv.program(),
        &spec,
        &config.warm.template_dir,
        config.warm.max_templates,
    )
    .await?;
    println!("{}", t.dir.display());
    println!("{}", serde_json::to_string_pretty(&t.manifest)?);
    Ok(())
}

/// The node config and the VM shape a subcommand names: `[--config PATH]
/// [--vcpus N] [--memory-mib N] [--hypervisor KIND]`, the config's
/// defaults for what is not given.
pub fn shape_args(
    args: &[String],
) -> Result<(Config, VmSizing), Box<dyn std::error::Error + Send + Sync>> {
    let mut config_path: Option<PathBuf> = None;
    let mut annotations = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--config" => config_path = Some(value()?.into()),
            flag @ ("--vcpus" | "--memory-mib") => {
                let v = value()?;
                let n: u32 = v.parse().map_err(|e| format!("{flag} {v:?}: {e}"))?;
                let key = if flag == "--vcpus" {
                    podvisor_names::annotations::VCPUS
                } else {
                    podvisor_names::annotations::MEMORY_MIB
                };
                annotations.insert(key.to_string(), n.to_string());
            }
            "--hypervisor" => {
                annotations.insert(
                    podvisor_names::annotations::HYPERVISOR.to_string(),
                    value()?,
                );
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--config PATH, --vcpus N, --memory-mib N, --hypervisor KIND)"
                )
                .into())
            }
        }
    }
    let config = Config::load(config_path.as_deref())?;
    let mut allowed = config.clone();
    allowed.allowed_annotations = podvisor_names::annotations::ALL.map(String::from).to_vec();
    let sizing = allowed.vm_sizing(&annotations)?;
    Ok((config, sizing))
}
