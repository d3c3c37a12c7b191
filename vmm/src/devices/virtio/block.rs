//! virtio-blk on a raw image file: read, write, flush and get-id, served
//! synchronously on the event loop. A read-only disk offers VIRTIO_BLK_F_RO
//! and fails writes with IOERR; a request beyond the end of the disk fails
//! with IOERR; unknown request types answer UNSUPP.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    complete, pop_chain, with_active, Active, DeviceError, VirtioDevice, F_VERSION_1, TYPE_BLOCK,
};

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_LEN: usize = 20;
const CHUNK: usize = 128 * 1024;

/// A request's header and the sizes of its data: to the device (`in`)
/// and to the guest (`out`).
#[derive(Debug, Clone, Copy)]
struct Request {
    kind: u32,
    sector: u64,
    in_len: usize,
    out_len: usize,
}

#[derive(Debug)]
pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    /// Reused for every request's data.
    buf: Vec<u8>,
    active: Option<Active>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, std::io::Error> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let len = file.metadata()?.len();
        let mut idb = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            sectors: len / SECTOR,
            read_only,
            id: idb,
            buf: Vec::new(),
            active: None,
        })
    }

    /// Serves one request; returns (status, bytes of data written to the guest).
    fn serve(
        &mut self,
        buf: &mut [u8],
        req: Request,
        data_in: &mut dyn Read,
        data_out: &mut dyn Write,
    ) -> (u8, usize) {
        let Request {
            kind,
            sector,
            in_len,
            out_len,
        } = req;
        let in_range = |len: usize| {
            sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len as u64))
                .is_some_and(|end| end <= self.sectors * SECTOR)
        };
        match kind {
            T_IN => {
                if !in_range(out_len) {
                    return (S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                let mut done = 0;
                while done < out_len {
                    let n = (out_len - done).min(CHUNK);
                    if self.file.read_exact_at(&mut buf[..n], off).is_err()
                        || data_out.write_all(&buf[..n]).is_err()
                    {
                        return (S_IOERR, done);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, done)
            }
            T_OUT => {
                if self.read_only || !in_range(in_len) {
                    return (S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                let mut done = 0;
                while done < in_len {
                    let n = (in_len - done).min(CHUNK);
                    if data_in.read_exact(&mut buf[..n]).is_err()
                        || self.file.write_all_at(&buf[..n], off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let n = out_len.min(ID_LEN);
                match data_out.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn process_active(&mut self, a: &mut Active) -> Result<(), DeviceError> {
        let bad = |what: &str| DeviceError::Chain(format!("block request: {what}"));
        while let Some(chain) = pop_chain(&mut a.queues[0], &a.mem)? {
            let head = chain.head_index();
            let mut r = chain
                .clone()
                .reader(&a.mem)
                .map_err(|e| bad(&e.to_string()))?;
            let mut w = chain.writer(&a.mem).map_err(|e| bad(&e.to_string()))?;
            let (kind, sector) = {
                let mut h = [0u8; 16];
                r.read_exact(&mut h)
                    .map_err(|_| bad("header shorter than 16 bytes"))?;
                (
                    u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
                    u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
                )
            };
            let out_len = w
                .available_bytes()
                .checked_sub(1)
                .ok_or_else(|| bad("no status byte"))?;
            let mut status_w = w.split_at(out_len).map_err(|e| bad(&e.to_string()))?;
            let in_len = r.available_bytes();
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(CHUNK, 0);
            let (status, written) = self.serve(
                &mut buf,
                Request {
                    kind,
                    sector,
                    in_len,
                    out_len,
                },
                &mut r,
                &mut w,
            );
            self.buf = buf;
            status_w.write_all(&[status])?;
            let used = u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1);
            complete(&mut a.queues[0], &a.mem, &a.irq, head, used)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_FLUSH | F_SEG_MAX | if self.read_only { F_RO } else { 0 }
    }
    /// capacity (sectors), size_max (unused), seg_max: data segments per
    /// request, leaving room in a chain for the header and status.
    fn config(&self) -> Vec<u8> {
        let mut c = self.sectors.to_le_bytes().to_vec();
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
    fn activate(&mut self, active: Active) -> Result<(), DeviceError> {
        self.active = Some(active);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        with_active(self, |b| &mut b.active, Block::process_active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::memory::GuestMemoryMmap;

    const HDR: u64 = 0x200000;
    const DATA: u64 = 0x300000;
    const STATUS: u64 = 0x400000;

    fn disk(ro: bool) -> (Block, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut content = vec![0u8; 8 * 512];
        for (i, b) in content.iter_mut().enumerate() {
            *b = u8::try_from(i / 512).unwrap();
        }
        std::fs::write(f.path(), &content).unwrap();
        (Block::open(f.path(), ro, "podvisor-disk0").unwrap(), f)
    }

    fn start(b: &mut Block, mem: &GuestMemoryMmap) {
        let q = mock(mem, 0).create_queue().unwrap();
        b.activate(active(mem, vec![q], F_VERSION_1).0).unwrap();
    }

    fn request(
        m: &Mock<'_>,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data_len: u32,
        write_data: bool,
    ) {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        write(mem, HDR, &h);
        let data_flags = if write_data { F_WRITE } else { 0 };
        let mut descs = vec![(0, desc(HDR, 16, F_NEXT, 1))];
        if data_len > 0 {
            descs.push((1, desc(DATA, data_len, data_flags | F_NEXT, 2)));
            descs.push((2, desc(STATUS, 1, F_WRITE, 0)));
        } else {
            descs.push((1, desc(STATUS, 1, F_WRITE, 0)));
        }
        add_chain(m, &descs, 0);
    }

    #[test]
    fn reads_writes_flushes_and_ids() {
        let mem = mem();
        let (mut b, f) = disk(false);
        assert_eq!(b.config()[..8], 8u64.to_le_bytes());
        assert_eq!(b.config()[12..16], 254u32.to_le_bytes());
        start(&mut b, &mem);
        let m = mock(&mem, 0);
        request(&m, &mem, T_IN, 3, 1024, true);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_OK]);
        assert_eq!(read(&mem, DATA, 1024)[..2], [3, 3]);
        assert_eq!(read(&mem, DATA + 512, 1)[0], 4);
        assert_eq!(used_len(&m, 0), 1025);

        write(&mem, DATA, &[0xab; 512]);
        request(&m, &mem, T_OUT, 7, 512, false);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_OK]);
        assert_eq!(std::fs::read(f.path()).unwrap()[7 * 512], 0xab);

        request(&m, &mem, T_FLUSH, 0, 0, false);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_OK]);

        request(&m, &mem, T_GET_ID, 0, 20, true);
        b.queue_event(0).unwrap();
        assert_eq!(&read(&mem, DATA, 14), b"podvisor-disk0");
        assert_eq!(used_count(&m), 4);
    }

    #[test]
    fn read_only_refuses_writes_and_out_of_range_fails() {
        let mem = mem();
        let (mut b, f) = disk(true);
        assert_ne!(b.features() & F_RO, 0);
        start(&mut b, &mem);
        let m = mock(&mem, 0);
        write(&mem, DATA, &[0xcd; 512]);
        request(&m, &mem, T_OUT, 0, 512, false);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_IOERR]);
        assert_eq!(std::fs::read(f.path()).unwrap()[0], 0);

        request(&m, &mem, T_IN, 7, 1024, true);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_IOERR]);
        request(&m, &mem, T_IN, u64::MAX / 2, 512, true);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_IOERR]);
        request(&m, &mem, 77, 0, 0, false);
        b.queue_event(0).unwrap();
        assert_eq!(read(&mem, STATUS, 1), [S_UNSUPP]);
    }

    #[test]
    fn malformed_chains_fail_the_device() {
        let mem = mem();
        // No status byte: header only.
        let (mut b, _f) = disk(false);
        start(&mut b, &mem);
        let m = mock(&mem, 0);
        add_chain(&m, &[(0, desc(HDR, 16, 0, 0))], 0);
        assert!(b.queue_event(0).is_err());
        // Short header.
        let (mut b, _f) = disk(false);
        start(&mut b, &mem);
        add_chain(
            &m,
            &[
                (0, desc(HDR, 4, F_NEXT, 1)),
                (1, desc(STATUS, 1, F_WRITE, 0)),
            ],
            0,
        );
        assert!(b.queue_event(0).is_err());
        // Data outside guest RAM.
        let (mut b, _f) = disk(false);
        start(&mut b, &mem);
        add_chain(
            &m,
            &[
                (0, desc(HDR, 16, F_NEXT, 1)),
                (1, desc(1 << 40, 512, F_WRITE | F_NEXT, 2)),
                (2, desc(STATUS, 1, F_WRITE, 0)),
            ],
            0,
        );
        assert!(b.queue_event(0).is_err());
    }
}
