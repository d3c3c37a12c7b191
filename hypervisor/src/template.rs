//! Warm-start templates: a VM of one shape (backend, kernel, initramfs,
//! kernel parameters, vCPUs, memory) booted once per node up to its agent
//! serving, saved, and restored as clones. This file owns the store under
//! the template root: the key (a hash of every input, so a changed input
//! makes a new template), the build lock (concurrent pods build a template
//! once), the manifest with its checksums, and the copy of guest memory
//! into each clone's own memfd (which the vhost-user backends map too, so
//! no guest-writable page is shared between VMs). The backends save and
//! restore ([`crate::Hypervisor::save_template`], [`crate::Hypervisor::restore`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use podvisor_vmm_config::sparse::next_data;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::{Hypervisor, HypervisorError, VmSpec};

/// Bumped when the layout or what a template holds changes.
const FORMAT: u32 = 1;
const PAGE: usize = 4096;
/// Guest memory, as the template VM left it (a sparse file).
pub const MEMORY: &str = "memory";
/// The backend's device and vCPU state.
pub const STATE: &str = "state";
const MANIFEST: &str = "manifest.json";

/// A saved template, its manifest read.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub backend: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel_params: String,
    /// Non-zero pages of guest memory, and their checksum (xxh3-128 of
    /// each page with its index).
    pub memory_pages: u64,
    pub memory_checksum: String,
    pub state_bytes: u64,
    pub state_checksum: String,
    /// Boot to the agent plus save, ms.
    pub build_ms: u64,
}

impl Template {
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Marks the template used now (its manifest's mtime), for pruning.
    fn touch(&self) {
        if let Ok(f) = File::options().append(true).open(self.dir.join(MANIFEST)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

fn bad(dir: &Path, reason: impl Into<String>) -> HypervisorError {
    HypervisorError::Template {
        dir: dir.to_owned(),
        reason: reason.into(),
    }
}

/// The template key of `spec` on `backend` (its description, and the VM
/// program it runs, by path, size and mtime; the kernel parameters every
/// guest gets): a hash of every input.
pub fn key(backend: &str, program: &Path, spec: &VmSpec) -> Result<String, HypervisorError> {
    let mut h = Xxh3::new();
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |source| HypervisorError::Io {
            what: format!("reading {what}"),
            source,
        }
    };
    h.update(format!("{FORMAT}\0{backend}\0{}\0", program.display()).as_bytes());
    if let Ok(m) = std::fs::metadata(resolve(program)) {
        h.update(format!("{}\0{}\0", m.len(), m.mtime()).as_bytes());
    }
    for f in [&spec.kernel, &spec.initramfs] {
        h.update(&std::fs::read(f).map_err(io(f))?);
        h.update(b"\0");
    }
    h.update(
        format!(
            "{}\0{}\0{}\0{}",
            spec.vcpus,
            spec.memory_mib,
            crate::GUEST_PARAMS,
            spec.kernel_params
        )
        .as_bytes(),
    );
    Ok(format!("{:032x}", h.digest128()))
}

/// `program` as found on PATH when it is a bare name.
fn resolve(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_owned();
    }
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_owned())
}

/// The template of `spec` on `hv` under `root`: the saved one, or one
/// built now (under a lock, so concurrent sandboxes build it once). A
/// saved one found damaged (its manifest unreadable or of another format,
/// a file of the wrong size) is removed and reported: this VM boots cold,
/// the next rebuilds it. A new template makes room: of the others, only
/// the `keep - 1` used last stay.
pub async fn get_or_build(
    hv: &dyn Hypervisor,
    program: &Path,
    spec: &VmSpec,
    root: &Path,
    keep: usize,
) -> Result<Template, HypervisorError> {
    let key = key(&hv.describe(), program, spec)?;
    let dir = root.join(&key);
    // Templates hold guest memory: root's alone.
    std::fs::create_dir_all(root)
        .and_then(|()| {
            std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|source| HypervisorError::Io {
            what: format!("creating {}", root.display()),
            source,
        })?;
    let _lock = crate::process::lock_file(&root.join(format!("{key}.lock")))
        .await
        .map_err(|source| HypervisorError::Io {
            what: format!("locking template {key}"),
            source,
        })?;
    if dir.exists() {
        return match open(&dir) {
            Ok(t) => {
                t.touch();
                Ok(t)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(bad(
                    &dir,
                    format!("unusable, removed (the next VM rebuilds it): {e}"),
                ))
            }
        };
    }
    let building = root.join(format!("{key}.building"));
    for d in [&dir, &building] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|source| HypervisorError::Io {
                what: format!("removing {}", d.display()),
                source,
            })?;
        }
    }
    std::fs::create_dir_all(&building).map_err(|source| HypervisorError::Io {
        what: format!("creating {}", building.display()),
        source,
    })?;
    let start = Instant::now();
    let tspec = VmSpec {
        dir: building.clone(),
        vsock: VmSpec::vsock_in(&building),
        shared_dir: building.clone(),
        net: Vec::new(),
        netns: None,
        // An id of its own (not the pod's that needed the template).
        owner: None,
        ..spec.clone()
    };
    let built = async {
        hv.save_template(&tspec).await?;
        let (memory_pages, memory_checksum) = copy_memory(&building, None)?;
        let state = std::fs::read(building.join(STATE)).map_err(|source| HypervisorError::Io {
            what: "reading the saved state".into(),
            source,
        })?;
        let manifest = Manifest {
            format: FORMAT,
            key: key.clone(),
            backend: hv.describe(),
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel_params: spec.kernel_params.clone(),
            memory_pages,
            memory_checksum,
            state_bytes: state.len() as u64,
            state_checksum: checksum(&state),
            build_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        let text =
            serde_json::to_string_pretty(&manifest).map_err(|e| bad(&building, e.to_string()))?;
        std::fs::write(building.join(MANIFEST), text).map_err(|source| HypervisorError::Io {
            what: "writing the template manifest".into(),
            source,
        })?;
        std::fs::rename(&building, &dir).map_err(|source| HypervisorError::Io {
            what: format!("moving the template into {}", dir.display()),
            source,
        })?;
        Ok::<_, HypervisorError>(manifest)
    }
    .await;
    match built {
        Ok(manifest) => {
            prune(root, &key, keep);
            tracing::info!(
                "template {key} built in {} ms: {} MiB of guest memory in use, {} KiB of device state",
                manifest.build_ms,
                (manifest.memory_pages * PAGE as u64) >> 20,
                manifest.state_bytes >> 10
            );
            Ok(Template { dir, manifest })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            Err(e)
        }
    }
}

/// Removes the templates under `root` but `key` and the `keep - 1` used
/// last (a template's manifest mtime is its last use).
fn prune(root: &Path, key: &str, keep: usize) {
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n != key && !n.to_string_lossy().contains('.'))
        })
        .map(|p| {
            let used = std::fs::metadata(p.join(MANIFEST))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (used, p)
        })
        .collect();
    others.sort();
    let extra = others.len().saturating_sub(keep.saturating_sub(1));
    for (_, p) in others.into_iter().take(extra) {
        match std::fs::remove_dir_all(&p) {
            Ok(()) => tracing::info!(
                "template {} removed: not among the {keep} used last",
                p.display()
            ),
            Err(e) => tracing::warn!("removing template {}: {e}", p.display()),
        }
        let _ = std::fs::remove_file(p.with_extension("lock"));
    }
}

/// The saved template in `dir`, its manifest and files' sizes checked
/// (contents are checked as a clone restores).
pub fn open(dir: &Path) -> Result<Template, HypervisorError> {
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .map_err(|e| bad(dir, format!("manifest: {e}")))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| bad(dir, format!("manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(
            dir,
            format!("format {} (this podvisor writes {FORMAT})", manifest.format),
        ));
    }
    let t = Template {
        dir: dir.to_owned(),
        manifest,
    };
    let len = |p: PathBuf| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    let memory = u64::from(t.manifest.memory_mib) << 20;
    if len(t.memory()) != memory {
        return Err(bad(
            dir,
            format!("memory file is {} bytes, not {memory}", len(t.memory())),
        ));
    }
    if len(t.state()) != t.manifest.state_bytes {
        return Err(bad(
            dir,
            format!(
                "state file is {} bytes, not {}",
                len(t.state()),
                t.manifest.state_bytes
            ),
        ));
    }
    Ok(t)
}

/// Takes a template VM's guest memory (`from`, in the VM's own directory,
/// its id's) to `to`, root's and read-only, out of any VM's reach; the
/// VM's directory goes. Only once the template VM has ended.
pub fn keep_memory(from: &Path, to: &Path) -> Result<(), HypervisorError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: String| move |source| HypervisorError::Io { what, source };
    // Through one descriptor, not following a link: what is checked is
    // what is given to root and moved.
    let memory = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .map_err(io(format!("opening {}", from.display())))?;
    let meta = memory
        .metadata()
        .map_err(io(format!("reading {}", from.display())))?;
    if !meta.file_type().is_file() {
        return Err(HypervisorError::Unavailable(format!(
            "{} is not a plain file",
            from.display()
        )));
    }
    std::os::unix::fs::fchown(&memory, Some(0), Some(0))
        .and_then(|()| memory.set_permissions(std::fs::Permissions::from_mode(0o444)))
        .map_err(io(format!("making {} root's", from.display())))?;
    std::fs::rename(from, to).map_err(io(format!("moving {}", from.display())))?;
    if let Some(vm_dir) = from.parent() {
        std::fs::remove_dir_all(vm_dir).map_err(io(format!("removing {}", vm_dir.display())))?;
    }
    Ok(())
}

/// Reads the template's state, checking its checksum.
pub fn read_state(t: &Template) -> Result<Vec<u8>, HypervisorError> {
    let state = std::fs::read(t.state()).map_err(|e| bad(&t.dir, format!("state: {e}")))?;
    if checksum(&state) != t.manifest.state_checksum {
        return Err(bad(
            &t.dir,
            "state checksum mismatch: the template is corrupt",
        ));
    }
    Ok(state)
}

/// A clone's guest memory: a memfd holding the template's non-zero pages
/// (zero pages stay unallocated), its checksum checked.
pub fn clone_memory(t: &Template) -> Result<File, HypervisorError> {
    let name = c"podvisor-guest-ram";
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(HypervisorError::Io {
            what: "memfd_create".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a new descriptor this function owns.
    let memfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    memfd
        .set_len(u64::from(t.manifest.memory_mib) << 20)
        .map_err(|source| HypervisorError::Io {
            what: "sizing the clone's memory".into(),
            source,
        })?;
    let (pages, sum) = copy_memory(&t.dir, Some(&memfd))?;
    if pages != t.manifest.memory_pages || sum != t.manifest.memory_checksum {
        return Err(bad(
            &t.dir,
            "memory checksum mismatch: the template is corrupt",
        ));
    }
    Ok(memfd)
}

/// Walks the data of `dir`'s memory file: counts and checksums its
/// non-zero pages, writing each into `to` at its offset.
fn copy_memory(dir: &Path, to: Option<&File>) -> Result<(u64, String), HypervisorError> {
    let path = dir.join(MEMORY);
    let io = |source| HypervisorError::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let f = File::open(&path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut h = Xxh3::new();
    let mut pages = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some((start, end)) = next_data(&f, pos, len) else {
            break;
        };
        let mut off = start - start % PAGE as u64;
        while off < end {
            let n = usize::try_from((end - off).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = &mut buf[..n];
            f.read_exact_at(chunk, off).map_err(io)?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                let at = off + (i * PAGE) as u64;
                h.update(&at.to_le_bytes());
                h.update(page);
                pages += 1;
                if let Some(to) = to {
                    to.write_all_at(page, at)
                        .map_err(|source| HypervisorError::Io {
                            what: "filling the clone's memory".into(),
                            source,
                        })?;
                }
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok((pages, format!("{:032x}", h.digest128())))
}

fn checksum(data: &[u8]) -> String {
    let mut h = Xxh3::new();
    h.update(data);
    format!("{:032x}", h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_copy_keeps_data_pages_and_skips_zero_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = File::create(d.path().join(MEMORY)).unwrap();
        f.set_len(64 * PAGE as u64).unwrap();
        f.write_all_at(&[7u8; PAGE], 3 * PAGE as u64).unwrap();
        f.write_all_at(&[0u8; PAGE], 5 * PAGE as u64).unwrap();
        f.write_all_at(b"end", 63 * PAGE as u64 + 10).unwrap();
        let to = tempfile::tempfile().unwrap();
        to.set_len(64 * PAGE as u64).unwrap();
        let (pages, sum) = copy_memory(d.path(), Some(&to)).unwrap();
        assert_eq!(pages, 2);
        let mut got = vec![0u8; 64 * PAGE];
        to.read_exact_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 64 * PAGE];
        want[3 * PAGE..4 * PAGE].fill(7);
        want[63 * PAGE + 10..63 * PAGE + 13].copy_from_slice(b"end");
        assert!(got == want);
        // One flipped byte changes the checksum.
        f.write_all_at(&[8u8], 3 * PAGE as u64 + 100).unwrap();
        assert_ne!(copy_memory(d.path(), None).unwrap().1, sum);
    }

    #[test]
    fn key_follows_every_input() {
        let d = tempfile::tempdir().unwrap();
        let (kernel, initramfs) = (d.path().join("kernel"), d.path().join("initramfs"));
        std::fs::write(&kernel, "kernel-1").unwrap();
        std::fs::write(&initramfs, "initramfs-1").unwrap();
        let spec = VmSpec {
            kernel: kernel.clone(),
            vmlinux: None,
            initramfs: initramfs.clone(),
            vcpus: 1,
            memory_mib: 512,
            kernel_params: String::new(),
            dir: d.path().into(),
            vsock: VmSpec::vsock_in(d.path()),
            shared_dir: d.path().into(),
            net: Vec::new(),
            netns: None,
            cpuid_hide: Vec::new(),
            owner: None,
        };
        let qemu = Path::new("/bin/true");
        let k = |s: &VmSpec| key("qemu/tcg", qemu, s).unwrap();
        let base = k(&spec);
        assert_eq!(base, k(&spec));
        assert_ne!(base, key("qemu/kvm", qemu, &spec).unwrap());
        assert_ne!(
            base,
            k(&VmSpec {
                memory_mib: 1024,
                ..spec.clone()
            })
        );
        assert_ne!(
            base,
            k(&VmSpec {
                vcpus: 2,
                ..spec.clone()
            })
        );
        assert_ne!(
            base,
            k(&VmSpec {
                kernel_params: "x=1".into(),
                ..spec.clone()
            })
        );
        std::fs::write(&initramfs, "initramfs-2").unwrap();
        assert_ne!(base, k(&spec));
        std::fs::write(&initramfs, "initramfs-1").unwrap();
        std::fs::write(&kernel, "kernel-2").unwrap();
        assert_ne!(base, k(&spec));
        assert!(key(
            "qemu/tcg",
            qemu,
            &VmSpec {
                kernel: d.path().join("none"),
                ..spec
            }
        )
        .is_err());
    }

    #[test]
    fn pruning_keeps_the_new_template_and_those_used_last() {
        let d = tempfile::tempdir().unwrap();
        let t0 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for (i, name) in ["a", "b", "c", "new"].iter().enumerate() {
            let dir = d.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let m = File::create(dir.join(MANIFEST)).unwrap();
            m.set_modified(t0 + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        std::fs::create_dir(d.path().join("x.building")).unwrap();
        prune(d.path(), "new", 3);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["b", "c", "new", "x.building"]);
    }
}
