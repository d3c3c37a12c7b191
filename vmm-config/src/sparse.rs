//! Sparse files, as snapshot memory files are (guest RAM in order, holes
//! for zero pages; QEMU's templates and podvisor-vmm's snapshots both):
//! walking their data extents.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The next data extent of `f` at or after `pos` and before `len`:
/// (start, end); none past the last one.
pub fn next_data(f: &File, pos: u64, len: u64) -> Option<(u64, u64)> {
    if pos >= len {
        return None;
    }
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor `f` owns.
        let r = unsafe { libc::lseek(f.as_raw_fd(), i64::try_from(off).ok()?, whence) };
        u64::try_from(r).ok()
    };
    let start = seek(pos, libc::SEEK_DATA)?;
    if start >= len {
        return None;
    }
    let end = seek(start, libc::SEEK_HOLE).unwrap_or(len).min(len);
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn walks_data_and_skips_holes() {
        let f = tempfile_in_tmp();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"x", 256 << 10).unwrap();
        let (s, e) = next_data(&f, 0, 1 << 20).unwrap();
        assert!(s <= 256 << 10 && e > 256 << 10 && e <= 1 << 20, "{s} {e}");
        assert_eq!(next_data(&f, e, 1 << 20), None);
        assert_eq!(next_data(&f, 0, 0), None);
    }

    fn tempfile_in_tmp() -> File {
        let p = std::env::temp_dir().join(format!("podvisor-sparse-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
