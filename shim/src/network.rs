//! The pod's network namespace carried into the VM, as Kata's tc-redirect
//! model does it. For each veth CNI put in the sandbox's namespace, a tap
//! is created beside it and the two are joined by tc: an ingress qdisc on
//! each and a match-all filter that redirects every frame to the other.
//! The VM process runs in that namespace and gets a virtio-net device on
//! the tap with the veth's MAC; the agent gives the guest NIC the veth's
//! addresses, MTU and routes. Teardown deletes the taps (their filters go
//! with them) and the veths' ingress qdiscs.
//!
//! The work is done by `ip` and `tc` (iproute2) run inside the namespace:
//! the same tools an operator uses to inspect it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use podvisor_protocol::api;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::process::Command;

use podvisor_hypervisor::NetDevice;

/// Taps are named `pvtap<N>` inside the pod's namespace.
const TAP_PREFIX: &str = "pvtap";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` in {netns}: {detail}")]
    Command {
        command: String,
        netns: PathBuf,
        detail: String,
    },
    #[error("interface {name} in {netns} is a {kind}, not a veth: podvisor carries only veths into the VM")]
    NotVeth {
        name: String,
        kind: String,
        netns: PathBuf,
    },
    #[error("network namespace {0} has no interface besides lo")]
    NoInterface(PathBuf),
}

/// One veth of the pod and the tap that stands for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub veth: String,
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    /// (address, prefix)
    pub addresses: Vec<(String, u32)>,
    /// (destination CIDR or "" for default, gateway or "")
    pub routes: Vec<(String, String)>,
}

/// What was set up in one namespace; recorded in the sandbox's state so a
/// crashed shim's `delete` can undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub links: Vec<Link>,
}

/// Runs `program args` inside `netns`; returns its stdout.
async fn run_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let ns: OwnedFd = std::fs::File::open(netns)
        .map_err(|source| NetworkError::Netns {
            path: netns.to_owned(),
            source,
        })?
        .into();
    let mut cmd = Command::new(program);
    cmd.args(args);
    let fd = ns.as_raw_fd();
    // SAFETY: setns(2) is async-signal-safe; `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let command = format!("{program} {}", args.join(" "));
    let out = cmd.output().await.map_err(|e| NetworkError::Command {
        command: command.clone(),
        netns: netns.to_owned(),
        detail: e.to_string(),
    })?;
    drop(ns);
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            netns: netns.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn json_in(netns: &Path, args: &[&str]) -> Result<Vec<Value>, NetworkError> {
    let out = run_in(netns, "ip", args).await?;
    let v: Value =
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).map_err(|e| {
            NetworkError::Command {
                command: format!("ip {}", args.join(" ")),
                netns: netns.to_owned(),
                detail: format!("unreadable JSON: {e}"),
            }
        })?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Routes of `dev` the guest needs: everything but the kernel's own
/// (connected routes come back when the address is set; link-local and
/// multicast the guest makes itself).
fn routes_from(list: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in list {
        if str_of(r, "protocol") == "kernel" || str_of(r, "type") == "multicast" {
            continue;
        }
        let dst = match str_of(r, "dst") {
            "default" => String::new(),
            d if d.starts_with("fe80:") || d.starts_with("ff00:") => continue,
            d if !d.contains('/') && !d.is_empty() => {
                format!("{d}/{}", if d.contains(':') { 128 } else { 32 })
            }
            d => d.to_string(),
        };
        out.push((dst, str_of(r, "gateway").to_string()));
    }
    out
}

impl PodNetwork {
    /// Reads the namespace's veths and joins each to a new tap.
    pub async fn setup(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let links = json_in(netns, &["-j", "-d", "link", "show"]).await?;
        let mut veths = Vec::new();
        for l in &links {
            let name = str_of(l, "ifname");
            if name == "lo" {
                continue;
            }
            let kind = l
                .pointer("/linkinfo/info_kind")
                .and_then(Value::as_str)
                .unwrap_or("device without a kind");
            if kind != "veth" {
                return Err(NetworkError::NotVeth {
                    name: name.to_string(),
                    kind: kind.to_string(),
                    netns: netns.to_owned(),
                });
            }
            veths.push((
                name.to_string(),
                str_of(l, "address").to_string(),
                l.get("mtu")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok())
                    .unwrap_or(1500),
            ));
        }
        if veths.is_empty() {
            return Err(NetworkError::NoInterface(netns.to_owned()));
        }
        let mut net = PodNetwork {
            netns: netns.to_owned(),
            links: Vec::new(),
        };
        for (i, (veth, mac, mtu)) in veths.into_iter().enumerate() {
            let addrs = json_in(netns, &["-j", "addr", "show", "dev", &veth]).await?;
            let mut addresses = Vec::new();
            for a in addrs
                .iter()
                .filter_map(|a| a.get("addr_info")?.as_array())
                .flatten()
            {
                if str_of(a, "scope") == "global" {
                    let prefix = a
                        .get("prefixlen")
                        .and_then(Value::as_u64)
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(0);
                    addresses.push((str_of(a, "local").to_string(), prefix));
                }
            }
            let mut routes =
                routes_from(&json_in(netns, &["-j", "route", "show", "dev", &veth]).await?);
            routes.extend(routes_from(
                &json_in(netns, &["-j", "-6", "route", "show", "dev", &veth]).await?,
            ));
            let link = Link {
                veth,
                tap: format!("{TAP_PREFIX}{i}"),
                mac,
                mtu,
                addresses,
                routes,
            };
            // Recorded before it exists, so a failure part-way is undone.
            net.links.push(link.clone());
            if let Err(e) = Self::join(netns, &link).await {
                net.teardown().await;
                return Err(e);
            }
        }
        Ok(net)
    }

    async fn join(netns: &Path, l: &Link) -> Result<(), NetworkError> {
        let mtu = l.mtu.to_string();
        let steps: [&[&str]; 3] = [
            // Owned by root: the VM process, root without capabilities
            // (hypervisor::jail), may then attach to it.
            &[
                "ip", "tuntap", "add", "dev", &l.tap, "mode", "tap", "user", "0",
            ],
            &["ip", "link", "set", "dev", &l.tap, "mtu", &mtu],
            &["ip", "link", "set", "dev", &l.tap, "up"],
        ];
        for s in steps {
            run_in(netns, s[0], &s[1..]).await?;
        }
        for (from, to) in [(&l.veth, &l.tap), (&l.tap, &l.veth)] {
            run_in(netns, "tc", &["qdisc", "add", "dev", from, "ingress"]).await?;
            run_in(
                netns,
                "tc",
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Removes the taps and the veths' ingress qdiscs. Errors are logged:
    /// a namespace already gone has nothing left to remove.
    pub async fn teardown(&self) {
        if !self.netns.exists() {
            return;
        }
        for l in &self.links {
            if let Err(e) = run_in(&self.netns, "ip", &["link", "del", "dev", &l.tap]).await {
                tracing::debug!("network teardown: {e}");
            }
            if let Err(e) = run_in(
                &self.netns,
                "tc",
                &["qdisc", "del", "dev", &l.veth, "ingress"],
            )
            .await
            {
                tracing::debug!("network teardown: {e}");
            }
        }
    }

    /// The VM's NICs.
    pub fn devices(&self) -> Vec<NetDevice> {
        self.links
            .iter()
            .map(|l| NetDevice {
                tap: l.tap.clone(),
                mac: l.mac.clone(),
            })
            .collect()
    }

    /// What the agent must do for the guest to match the namespace.
    pub fn request(&self) -> api::ConfigureNetworkRequest {
        let mut req = api::ConfigureNetworkRequest::new();
        for l in &self.links {
            let mut i = api::NetInterface::new();
            i.mac = l.mac.clone();
            i.name = l.veth.clone();
            i.mtu = l.mtu;
            for (a, p) in &l.addresses {
                let mut ip = api::IpAddress::new();
                ip.address = a.clone();
                ip.prefix = *p;
                i.addresses.push(ip);
            }
            req.interfaces.push(i);
            for (dst, gw) in &l.routes {
                let mut r = api::NetRoute::new();
                r.destination = dst.clone();
                r.gateway = gw.clone();
                r.device = l.veth.clone();
                req.routes.push(r);
            }
        }
        req
    }
}

/// The network namespace path of an OCI spec, if it names one.
pub fn netns_of(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_keep_what_the_guest_needs() {
        let v: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.88.0.1","flags":[]},
                {"dst":"10.88.0.0/16","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},
                {"dst":"10.96.0.1","gateway":"10.88.0.1"},
                {"dst":"fe80::/64","protocol":"kernel"},
                {"dst":"fd00::/64","gateway":"fd00::1"}]"#,
        )
        .unwrap();
        assert_eq!(
            routes_from(&v),
            vec![
                (String::new(), "10.88.0.1".into()),
                ("10.96.0.1/32".into(), "10.88.0.1".into()),
                ("fd00::/64".into(), "fd00::1".into()),
            ]
        );
    }

    #[test]
    fn request_names_guest_nics_after_the_veths() {
        let n = PodNetwork {
            netns: "/var/run/netns/x".into(),
            links: vec![Link {
                veth: "eth0".into(),
                tap: "pvtap0".into(),
                mac: "02:42:0a:58:00:05".into(),
                mtu: 1450,
                addresses: vec![("10.88.0.5".into(), 16)],
                routes: vec![(String::new(), "10.88.0.1".into())],
            }],
        };
        let r = n.request();
        assert_eq!(
            (r.interfaces[0].name.as_str(), r.interfaces[0].mtu),
            ("eth0", 1450)
        );
        assert_eq!(r.interfaces[0].addresses[0].address, "10.88.0.5");
        assert_eq!(
            (r.routes[0].gateway.as_str(), r.routes[0].device.as_str()),
            ("10.88.0.1", "eth0")
        );
        assert_eq!(n.devices()[0].tap, "pvtap0");
    }

    #[test]
    fn netns_comes_from_the_spec() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}
        }))
        .unwrap();
        assert_eq!(netns_of(&spec), Some(PathBuf::from("/var/run/netns/cni-1")));
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "network"}]}
        }))
        .unwrap();
        assert_eq!(netns_of(&spec), None);
    }

    /// Against hand-made namespaces (root, `ip` and `tc`): a tap (not a
    /// veth) is refused by name; two veths each get a tap joined by tc,
    /// and teardown removes taps and qdiscs.
    #[tokio::test]
    async fn non_veth_refused_two_veths_joined() {
        use std::process::Command;
        let ns = format!("pvt-net-{}", std::process::id());
        let path = PathBuf::from(format!("/var/run/netns/{ns}"));
        let run = |prog: &str, args: &[&str]| -> String {
            let out = Command::new(prog).args(args).output().unwrap();
            assert!(out.status.success(), "{prog} {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let ip = |args: &[&str]| run("ip", args);
        let tc = |args: &[&str]| run("tc", args);
        ip(&["netns", "add", &ns]);
        struct Cleanup(String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let ip = |args: &[&str]| Command::new("ip").args(args).output();
                let _ = ip(&["netns", "del", &self.0]);
                for i in 0..2 {
                    let _ = ip(&["link", "del", &format!("pvh{i}")]);
                }
            }
        }
        let _cleanup = Cleanup(ns.clone());

        ip(&["-n", &ns, "tuntap", "add", "dev", "t0", "mode", "tap"]);
        match PodNetwork::setup(&path).await {
            Err(NetworkError::NotVeth { name, kind, .. }) => {
                assert!(name == "t0" && kind == "tun", "refused {name} as {kind}")
            }
            other => panic!("a tap in the namespace must be refused, got {other:?}"),
        }
        ip(&["-n", &ns, "link", "del", "t0"]);
        for i in 0..2 {
            let (host, guest) = (format!("pvh{i}"), format!("pvg{i}"));
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", &guest, "netns", &ns,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.99.{i}.2/24"),
                "dev",
                &guest,
            ]);
            ip(&["-n", &ns, "link", "set", &guest, "up"]);
        }
        let net = PodNetwork::setup(&path).await.unwrap();
        assert_eq!(net.links.len(), 2);
        for (i, l) in net.links.iter().enumerate() {
            assert!(
                l.veth == format!("pvg{i}") && l.tap == format!("pvtap{i}"),
                "{l:?}"
            );
            assert_eq!(l.addresses, vec![(format!("10.99.{i}.2"), 24)], "{l:?}");
            let filters = tc(&["-n", &ns, "filter", "show", "dev", &l.veth, "ingress"]);
            assert!(
                filters.contains("mirred") && filters.contains(&l.tap),
                "filters on {}: {filters}",
                l.veth
            );
            let back = tc(&["-n", &ns, "filter", "show", "dev", &l.tap, "ingress"]);
            assert!(back.contains(&l.veth), "filters on {}: {back}", l.tap);
        }
        net.teardown().await;
        let links = ip(&["-n", &ns, "link", "show"]);
        assert!(
            !links.contains("pvtap"),
            "taps left after teardown:\n{links}"
        );
        for i in 0..2 {
            let q = tc(&["-n", &ns, "qdisc", "show", "dev", &format!("pvg{i}")]);
            assert!(!q.contains("ingress"), "ingress qdisc left on pvg{i}: {q}");
        }
    }
}
