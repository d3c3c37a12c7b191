//! Guest RAM: one memfd, mapped into the guest as RAM below the MMIO gap
//! and, for large guests, above 4 GiB. A memfd (not anonymous memory) so
//! that vhost-user backends such as virtiofsd can map the same pages.
//! [`save`] and [`load`] move it to and from a snapshot's memory file, a
//! sparse file in RAM order whose holes are zero pages.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use podvisor_vmm_config::sparse::next_data;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

pub use podvisor_vmm_config::limits::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")]
    Size(u64),
    #[error("creating the guest memory memfd: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the guest memory memfd to {mib} MiB: {source}")]
    Truncate { mib: u64, source: std::io::Error },
    #[error("mapping {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} is {len} bytes; a {mib} MiB guest's is {}", mib << 20)]
    FileSize { path: String, len: u64, mib: u64 },
    #[error("guest memory at {addr:#x}: {source}")]
    Guest {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

const PAGE: usize = 4096;
/// Bytes moved per read or write.
const CHUNK: usize = 1 << 20;

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError {
    let path = path.display().to_string();
    move |source| MemoryError::File { what, path, source }
}

/// Writes guest memory to `path` (created or truncated) in RAM order,
/// leaving zero pages as holes; only the pages the memfd holds (the ones
/// ever touched) are read. Returns the pages written.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, MemoryError> {
    let f = File::create(path).map_err(file_err("creating", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut pages = 0;
    for r in mem.iter() {
        let start = r.start_addr().0;
        // The memfd's allocated extents within this region (all of it
        // where the backing cannot say).
        let extents = match r.file_offset() {
            Some(fo) => data_extents(fo.file(), fo.start(), r.len()),
            None => vec![(0, r.len())],
        };
        for (from, to) in extents {
            let mut done = from;
            while done < to {
                let n = usize::try_from((to - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                let addr = start + done;
                mem.read_slice(&mut buf[..n], GuestAddress(addr))
                    .map_err(|source| MemoryError::Guest { addr, source })?;
                for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        f.write_all_at(page, offset + done + (i * PAGE) as u64)
                            .map_err(file_err("writing", path))?;
                        pages += 1;
                    }
                }
                done += n as u64;
            }
        }
        offset += r.len();
    }
    f.set_len(offset).map_err(file_err("sizing", path))?;
    f.sync_all().map_err(file_err("syncing", path))?;
    Ok(pages)
}

/// The data extents of `f` in `[base, base + len)`, relative to `base`
/// and page-aligned.
fn data_extents(f: &File, base: u64, len: u64) -> Vec<(u64, u64)> {
    let end = base + len;
    let mut out = Vec::new();
    let mut pos = base;
    while let Some((s, e)) = next_data(f, pos, end) {
        let s = s - s % PAGE as u64;
        out.push((s.max(base) - base, e.min(end) - base));
        pos = e;
    }
    out
}

/// New guest memory of `mib` MiB holding the memory file at `path` (only
/// read): its data pages are copied in, its holes stay unallocated.
pub fn load(path: &Path, mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let f = File::open(path).map_err(file_err("opening", path))?;
    let len = f.metadata().map_err(file_err("reading", path))?.len();
    if len != mib << 20 {
        return Err(MemoryError::FileSize {
            path: path.display().to_string(),
            len,
            mib,
        });
    }
    let mem = create(mib)?;
    let ranges = ram_ranges(len);
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while let Some((start, end)) = next_data(&f, pos, len) {
        let mut off = start - start % PAGE as u64;
        while off < end {
            let n = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            f.read_exact_at(&mut buf[..n], off)
                .map_err(file_err("reading", path))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                let addr = guest_addr(&ranges, off + (i * PAGE) as u64);
                mem.write_slice(page, GuestAddress(addr))
                    .map_err(|source| MemoryError::Guest { addr, source })?;
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok(mem)
}

/// The guest address of byte `offset` of RAM laid out in `ranges` order.
fn guest_addr(ranges: &[(GuestAddress, u64)], mut offset: u64) -> u64 {
    for (start, len) in ranges {
        if offset < *len {
            return start.0 + offset;
        }
        offset -= len;
    }
    u64::MAX
}

/// The guest-physical ranges RAM occupies for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Creates the guest's RAM: `mib` MiB in a memfd.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let size = mib << 20;
    // SAFETY: a plain syscall with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"podvisor-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { mib, source })?;
    let mut offset = 0;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        let bytes = usize::try_from(len).map_err(|_| MemoryError::Size(mib))?;
        regions.push((addr, bytes, Some(FileOffset::new(f, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions)
        .map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_below_the_gap() {
        let mem = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let r = mem.iter().next().unwrap();
        assert!(r.file_offset().is_some(), "RAM must be shareable");
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn save_and_load_keep_data_and_leave_zero_pages_as_holes() {
        let mem = create(64).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        assert_eq!(save(&mem, &p).unwrap(), 2);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages were written");
        let back = load(&p, 64).unwrap();
        let mut b = [0u8; 10];
        back.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"first page");
        assert_eq!(
            back.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0x1234_5678
        );
        // A file of another size is refused, naming both sizes.
        let e = load(&p, 128).unwrap_err().to_string();
        assert!(e.contains("67108864 bytes") && e.contains("128 MiB"), "{e}");
    }

    #[test]
    fn save_reads_only_what_the_memfd_holds() {
        let mem = create(64).unwrap();
        let r = mem.iter().next().unwrap();
        let fo = r.file_offset().unwrap();
        assert!(data_extents(fo.file(), 0, 64 << 20).is_empty());
        mem.write_obj(1u8, GuestAddress(5 * PAGE as u64 + 3))
            .unwrap();
        let e = data_extents(fo.file(), 0, 64 << 20);
        assert!(
            e.len() == 1 && e[0].0 <= 5 * PAGE as u64 && e[0].1 >= 6 * PAGE as u64,
            "{e:?}"
        );
    }

    #[test]
    fn large_guest_memory_file_maps_around_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(guest_addr(&r, 0), 0);
        assert_eq!(guest_addr(&r, MMIO_GAP_START), MMIO_GAP_END);
    }

    #[test]
    fn refuses_sizes_out_of_range() {
        assert!(matches!(create(0), Err(MemoryError::Size(0))));
        assert!(matches!(create(8), Err(MemoryError::Size(8))));
        assert!(matches!(
            create(MAX_MEMORY_MIB + 1),
            Err(MemoryError::Size(_))
        ));
    }
}
