//! Registering the podvisor runtime in containerd's config (formats v2 and
//! v3) with `toml_edit`: the runtime's table is added under the CRI plugin,
//! marked as ours, and everything else in the file stays byte for byte.
//! Removing it gives back the original file. A `podvisor` runtime the
//! operator registered themselves (no marker) is theirs: left as it is.

use toml_edit::{Array, DocumentMut, Item, Table, Value};

use podvisor_names::annotations::PASSED as POD_ANNOTATIONS;
use podvisor_names::{HANDLER as RUNTIME, RUNTIME_TYPE};
const MARKER: &str = "# Added by podvisor-install; `podvisor-install uninstall` removes it.";

#[derive(Debug, thiserror::Error)]
pub enum ConfigEditError {
    #[error("not TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    #[error(
        "containerd config version {0} is not supported (2 and 3 are); \
         migrate it with `containerd config migrate`"
    )]
    Version(i64),
    #[error("{0} is not a table")]
    NotATable(String),
}

/// Where a config version keeps its runtimes.
fn runtimes_path(doc: &DocumentMut) -> Result<[&'static str; 4], ConfigEditError> {
    // containerd reads a file without `version` as version 1.
    match doc.get("version").and_then(Item::as_integer).unwrap_or(1) {
        2 => Ok([
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]),
        3 => Ok([
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]),
        v => Err(ConfigEditError::Version(v)),
    }
}

/// The config with the podvisor runtime registered. Equal to `text` when it
/// is registered already (by us, or by the operator).
pub fn add_runtime(text: &str) -> Result<String, ConfigEditError> {
    let mut doc: DocumentMut = text.parse()?;
    let path = runtimes_path(&doc)?;
    let mut table = doc.as_table_mut();
    let mut walked = String::new();
    for key in path {
        walked = if walked.is_empty() {
            key.to_string()
        } else {
            format!("{walked}.{key}")
        };
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item
            .as_table_mut()
            .ok_or_else(|| ConfigEditError::NotATable(walked.clone()))?;
    }
    let wanted = runtime_table();
    match table.get(RUNTIME) {
        Some(Item::Table(existing)) if !is_marked(existing) || same_settings(existing, &wanted) => {
            return Ok(text.to_string())
        }
        Some(item) if !item.is_table() => {
            return Err(ConfigEditError::NotATable(format!("{walked}.{RUNTIME}")))
        }
        _ => {}
    }
    table.insert(RUNTIME, Item::Table(wanted));
    Ok(doc.to_string())
}

/// The config without the runtime table podvisor-install added (a table
/// an operator wrote without our marker is left alone).
pub fn remove_runtime(text: &str) -> Result<String, ConfigEditError> {
    let mut doc: DocumentMut = text.parse()?;
    let path = runtimes_path(&doc)?;
    if !remove_marked(doc.as_table_mut(), &path) {
        return Ok(text.to_string());
    }
    Ok(doc.to_string())
}

/// Removes the marked runtime under `path`, and the implicit tables that
/// held only it. Returns whether anything was removed.
fn remove_marked(table: &mut Table, path: &[&str]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        let ours = table
            .get(RUNTIME)
            .and_then(Item::as_table)
            .is_some_and(is_marked);
        if ours {
            table.remove(RUNTIME);
        }
        return ours;
    };
    let Some(child) = table.get_mut(first).and_then(Item::as_table_mut) else {
        return false;
    };
    let removed = remove_marked(child, rest);
    if removed && child.is_implicit() && child.is_empty() {
        table.remove(first);
    }
    removed
}

fn runtime_table() -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
    let mut annotations = Array::new();
    annotations.push(POD_ANNOTATIONS);
    t.insert("pod_annotations", toml_edit::value(annotations));
    t.decor_mut().set_prefix(format!("\n{MARKER}\n"));
    t
}

fn is_marked(t: &Table) -> bool {
    t.decor()
        .prefix()
        .and_then(|p| p.as_str())
        .is_some_and(|p| p.contains(MARKER))
}

fn same_settings(a: &Table, b: &Table) -> bool {
    let render = |t: &Table| {
        t.iter()
            .map(|(k, v)| {
                let v = v
                    .as_value()
                    .map(Value::to_string)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                (k.to_string(), v)
            })
            .collect::<Vec<_>>()
    };
    render(a) == render(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = r#"version = 2
root = "/var/lib/containerd"

# CRI
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true   # keep me

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"#;

    #[test]
    fn v2_gains_the_runtime_and_keeps_the_rest() {
        let out = add_runtime(V2).unwrap();
        // Added after runc, as a person would; every original line kept.
        let added: Vec<&str> = out
            .lines()
            .filter(|l| !V2.lines().any(|o| o == *l))
            .collect();
        assert_eq!(
            added,
            [
                MARKER,
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.podvisor]",
                "runtime_type = \"io.containerd.podvisor.v2\"",
                "pod_annotations = [\"podvisor.io/*\"]",
            ],
            "{out}"
        );
        assert_eq!(
            out.len(),
            V2.len() + added.iter().map(|l| l.len() + 1).sum::<usize>() + 1
        );
        let doc: DocumentMut = out.parse().unwrap();
        let rt = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["podvisor"];
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            rt["pod_annotations"]
                .as_array()
                .unwrap()
                .get(0)
                .unwrap()
                .as_str(),
            Some(POD_ANNOTATIONS)
        );
        assert_eq!(
            add_runtime(&out).unwrap(),
            out,
            "second run changed the file"
        );
        assert_eq!(remove_runtime(&out).unwrap(), V2);
    }

    #[test]
    fn v3_uses_the_cri_runtime_plugin() {
        let v3 = "version = 3\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.runtime']\n    enable_cdi = true\n";
        let out = add_runtime(v3).unwrap();
        let doc: DocumentMut = out.parse().unwrap();
        assert_eq!(
            doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["podvisor"]
                ["runtime_type"]
                .as_str(),
            Some(RUNTIME_TYPE)
        );
        assert!(doc["plugins"].get("io.containerd.grpc.v1.cri").is_none());
        assert_eq!(add_runtime(&out).unwrap(), out);
        assert_eq!(remove_runtime(&out).unwrap(), v3);
    }

    #[test]
    fn a_bare_version_line_works() {
        let out = add_runtime("version = 2\n").unwrap();
        assert!(
            out.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.podvisor]"),
            "{out}"
        );
        assert_eq!(remove_runtime(&out).unwrap(), "version = 2\n");
    }

    #[test]
    fn an_operators_own_entry_is_left_alone() {
        let mine = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.podvisor]\nruntime_type = \"io.containerd.podvisor.v2\"\n";
        assert_eq!(add_runtime(mine).unwrap(), mine);
        assert_eq!(remove_runtime(mine).unwrap(), mine);
    }

    #[test]
    fn an_older_entry_of_ours_is_updated() {
        let old = add_runtime("version = 2\n")
            .unwrap()
            .replace("[\"podvisor.io/*\"]", "[]");
        let out = add_runtime(&old).unwrap();
        assert!(out.contains("[\"podvisor.io/*\"]"), "{out}");
        assert_eq!(remove_runtime(&out).unwrap(), "version = 2\n");
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let e = add_runtime("[plugins.cri]\n").unwrap_err();
        assert!(e.to_string().contains("version 1 is not supported"), "{e}");
        assert!(
            matches!(add_runtime("version = 2\nplugins = 3\n"), Err(ConfigEditError::NotATable(p)) if p == "plugins")
        );
        assert!(matches!(
            add_runtime("version = = 2"),
            Err(ConfigEditError::Parse(_))
        ));
        assert!(remove_runtime("version = 9\n").is_err());
    }

    #[test]
    fn removing_from_a_file_without_it_changes_nothing() {
        assert_eq!(remove_runtime(V2).unwrap(), V2);
    }

    /// The local cluster's containerd config (cluster/up.sh) registers
    /// podvisor with the settings this module adds on a node.
    #[test]
    fn the_local_cluster_registers_the_runtime_as_installed() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cluster/containerd-podvisor.toml"
        );
        let local = std::fs::read_to_string(path).unwrap();
        let settings = |text: &str| -> Vec<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| l.starts_with('[') || l.contains(" = "))
                .map(String::from)
                .collect()
        };
        let installed = add_runtime("version = 2\n").unwrap();
        assert_eq!(settings(&local), settings(&installed)[1..], "{installed}");
    }
}
