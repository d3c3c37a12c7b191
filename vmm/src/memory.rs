//! Guest RAM: one memfd, mapped into the guest as RAM below the MMIO gap
//! and, for large guests, above 4 GiB. A memfd (not anonymous memory) so
//! that vhost-user backends such as virtiofsd can map the same pages.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

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
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

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
    fn refuses_sizes_out_of_range() {
        assert!(matches!(create(0), Err(MemoryError::Size(0))));
        assert!(matches!(create(8), Err(MemoryError::Size(8))));
        assert!(matches!(
            create(MAX_MEMORY_MIB + 1),
            Err(MemoryError::Size(_))
        ));
    }
}
