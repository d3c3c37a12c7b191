//! A virtio-mmio device as a guest drives it (`podvisor_vmm::devices::
//! virtio`): the guest's memory and every register write are the
//! fuzzer's. The transport is set up as Linux's driver does (every feature
//! the device offers, each queue's three rings at fixed addresses,
//! DRIVER_OK); the input's memory image goes where the rings are, and its
//! operations run: register reads and writes, config-space writes, guest
//! memory writes (a guest changing its rings between kicks), queue kicks,
//! the device's own descriptors ready. Nothing may panic: a device that
//! meets data it cannot accept fails (DEVICE_NEEDS_RESET) and the VMM
//! goes on.
//!
//! Input: byte 0 picks the device (rng, block on a 64 KiB file, vsock on
//! a Unix socket, net on a datagram socket for its tap); bytes 1..3 the
//! length of the memory image (at most 64 KiB, written at 0x10000); then
//! operations of 8 bytes each: kind, two bytes of register, queue or
//! address, four of value, one of length (for net's "descriptor ready",
//! the host first sends a frame of that many 8-byte words past the
//! header).
#![no_main]

use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::devices::virtio::block::Block;
use podvisor_vmm::devices::virtio::mmio::{
    MmioTransport, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK,
};
use podvisor_vmm::devices::virtio::net::{Net, HDR_LEN};
use podvisor_vmm::devices::virtio::rng::Rng;
use podvisor_vmm::devices::virtio::vsock::Vsock;
use podvisor_vmm::devices::virtio::VirtioDevice;
use podvisor_vmm::devices::BusDevice;
use podvisor_vmm::memory;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Where the rings (and the memory image) are.
const RINGS: u64 = 0x10000;
const IMAGE_MAX: usize = 0x10000;
const QUEUE_SIZE: u32 = 16;

/// A directory of this process's for the block file and vsock sockets.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("podvisor-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// What Linux's virtio_mmio driver does: acknowledge, take every feature
/// offered, queue `i`'s rings at RINGS + 0x1000 * i, DRIVER_OK.
fn drive(t: &mut MmioTransport) {
    wr(t, 0x70, S_ACKNOWLEDGE);
    wr(t, 0x70, S_ACKNOWLEDGE | S_DRIVER);
    for sel in 0..2 {
        wr(t, 0x14, sel);
        let f = rd(t, 0x10);
        wr(t, 0x24, sel);
        wr(t, 0x20, f);
    }
    wr(t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    for q in 0..3u32 {
        wr(t, 0x30, q);
        if rd(t, 0x34) == 0 {
            break;
        }
        wr(t, 0x38, QUEUE_SIZE);
        let base = RINGS + 0x1000 * u64::from(q);
        for (reg, addr) in [(0x80, base), (0x90, base + 0x400), (0xa0, base + 0x800)] {
            wr(t, reg, addr as u32);
            wr(t, reg + 4, (addr >> 32) as u32);
        }
        wr(t, 0x44, 1);
    }
    wr(
        t,
        0x70,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mem = memory::create(16).expect("guest memory");
    let image_len = usize::from(u16::from_le_bytes([data[1], data[2]]))
        .min(IMAGE_MAX)
        .min(data.len() - 3);
    mem.write_slice(&data[3..3 + image_len], GuestAddress(RINGS))
        .expect("memory image");
    let ops = &data[3 + image_len..];

    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut made = None;
    let mut tap_peer = None;
    let device: Box<dyn VirtioDevice> = match data[0] % 4 {
        0 => Box::new(Rng::new()),
        1 => {
            let path = scratch().join("disk");
            let f = std::fs::File::create(&path).expect("disk file");
            f.set_len(64 << 10).expect("disk size");
            Box::new(Block::open(&path, data[0] & 0x80 != 0, "fuzz").expect("block device"))
        }
        2 => {
            let uds = scratch().join(format!("vsock-{n}"));
            let v = Vsock::new(3, &uds).expect("vsock device");
            made = Some(uds);
            Box::new(v)
        }
        _ => {
            let (tap, peer) = UnixDatagram::pair().expect("tap pair");
            tap.set_nonblocking(true).expect("non-blocking tap");
            peer.set_nonblocking(true).expect("non-blocking peer");
            tap_peer = Some(peer);
            let mac = (data[0] & 0x80 != 0).then_some([2, 0, 0, 0, 0, 1]);
            Box::new(Net::from_file(
                File::from(std::os::fd::OwnedFd::from(tap)),
                mac,
            ))
        }
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irq eventfd");
    let mut t = MmioTransport::new(device, mem.clone(), irq, "fuzz".into()).expect("transport");
    drive(&mut t);
    for op in ops.chunks_exact(8) {
        let arg = u16::from_le_bytes([op[1], op[2]]);
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 6 {
            0 => wr(&mut t, u64::from(arg & 0xfc), value),
            1 => {
                let _ = rd(&mut t, u64::from(arg & 0x1ff));
            }
            2 => t.kick(usize::from(arg % 4)),
            3 => t.write(
                0x100 + u64::from(arg & 0xff),
                &value.to_le_bytes()[..usize::from(op[7] % 5)],
            ),
            4 => {
                let at = RINGS + u64::from(arg) * 4;
                let _ = mem.write_obj(value, GuestAddress(at));
            }
            _ => {
                if let Some(peer) = &tap_peer {
                    let frame = vec![op[7]; HDR_LEN + 8 * usize::from(op[7])];
                    let _ = peer.send(&frame);
                }
                t.fd_ready(usize::from(arg % 4))
            }
        }
    }
    drop(t);
    if let Some(uds) = made {
        let _ = std::fs::remove_file(uds);
    }
});
