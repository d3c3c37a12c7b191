//! Whether `/dev/kvm` runs guest code at hardware speed, asked once per
//! host boot: `podvisor-vmm --probe` runs a tiny guest out of process (this
//! crate links no KVM code) and its verdict is cached in the state root,
//! keyed by the boot id, the kernel release and the `/dev/kvm` device, so
//! a sandbox start normally costs one small file read. Concurrent first
//! starts serialise on a lock so the probe runs once, unloaded by its
//! siblings.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

pub use podvisor_vmm_config::probe::Verdict;

/// The cache file and its lock, in the state root.
const CACHE: &str = "kvm-probe.json";
const LOCK: &str = "kvm-probe.lock";
/// The probe guest runs well under a second even where KVM emulates.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a verdict holds for: this boot of this kernel with this `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    pub boot_id: String,
    pub kernel_release: String,
    /// `/dev/kvm`'s device number and inode.
    pub kvm_device: String,
}

impl HostKey {
    /// This host's key; `Err` when there is no `/dev/kvm` to probe.
    pub fn current() -> Result<HostKey, String> {
        let kvm = std::fs::metadata("/dev/kvm").map_err(|e| format!("/dev/kvm: {e}"))?;
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("reading {p}: {e}"))
        };
        Ok(HostKey {
            boot_id: crate::process::boot_id().map_err(|e| format!("reading the boot id: {e}"))?,
            kernel_release: read("/proc/sys/kernel/osrelease")?,
            kvm_device: format!("{:#x} ino {}", kvm.rdev(), kvm.ino()),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    key: HostKey,
    verdict: Verdict,
}

/// The verdict for this host, from the cache under `state_root` or by
/// running `vmm --probe` (and caching what it says).
pub async fn verdict(vmm: &Path, state_root: &Path) -> Verdict {
    match HostKey::current() {
        Ok(key) => verdict_for(&key, vmm, state_root).await,
        Err(why) => Verdict::Unavailable(why),
    }
}

/// [`verdict`] for a given host key.
pub async fn verdict_for(key: &HostKey, vmm: &Path, state_root: &Path) -> Verdict {
    let cache = state_root.join(CACHE);
    if let Some(v) = read_cache(&cache, key) {
        return v;
    }
    // One prober at a time; whoever waited finds the cache written.
    let _lock = match crate::process::lock_file(&state_root.join(LOCK))
        .await
        .map_err(|e| format!("locking the KVM probe: {e}"))
    {
        Ok(l) => l,
        Err(e) => return Verdict::Unavailable(e),
    };
    if let Some(v) = read_cache(&cache, key) {
        return v;
    }
    let verdict = run_probe(vmm).await;
    // A VMM that could not say (missing binary, no access) is asked again
    // next time: that is cheap, and the cause may be fixed meanwhile.
    if !matches!(verdict, Verdict::Unavailable(_)) {
        if let Err(e) = write_cache(&cache, key, &verdict) {
            tracing::warn!(
                "caching the KVM probe's verdict in {}: {e}",
                cache.display()
            );
        }
    }
    verdict
}

fn read_cache(path: &Path, key: &HostKey) -> Option<Verdict> {
    let text = std::fs::read_to_string(path).ok()?;
    let cached: Cached = serde_json::from_str(&text).ok()?;
    (cached.key == *key).then_some(cached.verdict)
}

fn write_cache(path: &Path, key: &HostKey, verdict: &Verdict) -> std::io::Result<()> {
    let json = serde_json::to_vec(&Cached {
        key: key.clone(),
        verdict: verdict.clone(),
    })
    .map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Runs `vmm --probe`, which prints its verdict as one JSON line.
async fn run_probe(vmm: &Path) -> Verdict {
    let unavailable =
        |why: String| Verdict::Unavailable(format!("{} --probe: {why}", vmm.display()));
    let mut cmd = Command::new(vmm);
    cmd.arg("--probe").kill_on_drop(true);
    let out = match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
        Err(_) => return unavailable(format!("no verdict within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => return unavailable(e.to_string()),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last().map(serde_json::from_str::<Verdict>) {
        Some(Ok(v)) if out.status.success() => v,
        _ => unavailable(format!(
            "{}: {:?}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn key(boot: &str) -> HostKey {
        HostKey {
            boot_id: boot.into(),
            kernel_release: "6.1.0".into(),
            kvm_device: "0xae8 ino 7".into(),
        }
    }

    /// A stand-in VMM that counts its runs and prints `line`.
    fn fake_vmm(dir: &Path, line: &str) -> PathBuf {
        let p = dir.join("vmm");
        let count = dir.join("runs");
        write_script(
            &p,
            &format!(
                "#!/bin/sh\necho run >> {}\necho '{line}'\n",
                count.display()
            ),
        );
        p
    }

    /// Writes an executable script through another process: a descriptor
    /// open for writing here could be inherited by a concurrent test's fork
    /// and make running the script fail with ETXTBSY.
    fn write_script(path: &Path, text: &str) {
        use std::io::Write;
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sh.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        assert!(sh.wait().unwrap().success());
    }

    fn runs(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn probes_once_per_boot() {
        let d = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(d.path(), r#"{"slow":{"mips":1.5}}"#);
        let root = d.path().join("state");
        let v = verdict_for(&key("a"), &vmm, &root).await;
        assert_eq!(v, Verdict::Slow { mips: 1.5 });
        assert_eq!(verdict_for(&key("a"), &vmm, &root).await, v);
        assert_eq!(runs(d.path()), 1, "the second start read the cache");
        // Another boot (or kernel, or /dev/kvm) asks again.
        verdict_for(&key("b"), &vmm, &root).await;
        assert_eq!(runs(d.path()), 2);
        let mut other = key("b");
        other.kvm_device = "0xae8 ino 8".into();
        verdict_for(&other, &vmm, &root).await;
        assert_eq!(runs(d.path()), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_starts_probe_once() {
        let d = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(d.path(), r#"{"fast":{"mips":3000.0}}"#);
        // Slow enough that every start arrives while the first probes.
        let script = std::fs::read_to_string(&vmm).unwrap();
        write_script(&vmm, &script.replace("echo run", "sleep 0.3; echo run"));
        let root = d.path().join("state");
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let (vmm, root) = (vmm.clone(), root.clone());
                tokio::spawn(async move { verdict_for(&key("a"), &vmm, &root).await })
            })
            .collect();
        for s in starts {
            assert!(s.await.unwrap().is_fast());
        }
        assert_eq!(runs(d.path()), 1);
    }

    #[tokio::test]
    async fn a_vmm_that_cannot_say_is_unavailable_and_not_cached() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("state");
        let v = verdict_for(&key("a"), &d.path().join("missing"), &root).await;
        assert!(
            matches!(&v, Verdict::Unavailable(why) if why.contains("missing --probe")),
            "{v:?}"
        );
        let vmm = fake_vmm(d.path(), "not json");
        let v = verdict_for(&key("a"), &vmm, &root).await;
        assert!(
            matches!(&v, Verdict::Unavailable(why) if why.contains("not json")),
            "{v:?}"
        );
        verdict_for(&key("a"), &vmm, &root).await;
        assert_eq!(runs(d.path()), 2, "failures are not cached");
    }
}
