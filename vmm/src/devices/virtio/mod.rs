//! Virtio devices over the virtio-mmio transport (version 2).
//!
//! [`mmio::MmioTransport`] owns the registers a driver programs and hands
//! a device its queues on DRIVER_OK. Each device implements
//! [`VirtioDevice`]: its features and config space, what to do when a
//! queue is kicked, and any other file descriptors it waits on (a tap, a
//! vsock's sockets). A device that meets guest data it cannot accept (a
//! descriptor outside RAM, a corrupt ring) returns an error; the transport
//! then marks it DEVICE_NEEDS_RESET and ignores it until the driver resets
//! it. Nothing a guest writes may panic or block the VMM.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

pub use virtio_queue::Queue;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Every podvisor device is a modern (1.0+) device.
pub const F_VERSION_1: u64 = 1 << 32;

pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("descriptor chain: {0}")]
    Chain(String),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A device's interrupt: the INTERRUPT_STATUS bits it shares with its
/// transport, and the irqfd KVM turns into an IOAPIC edge.
#[derive(Clone, Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("raising a virtio interrupt: {e}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.raise(INT_VRING);
    }

    /// The config space (or the device status) changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets status bits without raising the interrupt (a restore: the
    /// interrupt controller's own state says whether it is pending).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Interrupt,
    /// The queues' notify eventfds (KVM ioeventfds), for vhost-user
    /// devices that hand them to their backend.
    pub kicks: Vec<EventFd>,
    pub features: u64,
}

pub trait VirtioDevice: Send {
    /// What the device was handed on activation (its queues as it moves
    /// them), none before.
    fn active(&self) -> Option<&Active>;
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; their count is the device's queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn config(&self) -> Vec<u8>;
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, active: Active) -> Result<(), DeviceError>;
    /// Back to the state before activation.
    fn reset(&mut self);
    /// Queue `index` was kicked.
    fn queue_event(&mut self, index: usize) -> Result<(), DeviceError>;
    /// False for vhost-user devices: their kicks go to the backend.
    fn handles_kicks(&self) -> bool {
        true
    }
    /// Other descriptors to poll; fixed for the device's lifetime.
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fds()[index]` is ready.
    fn fd_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Why the device cannot be saved in a snapshot now, if it cannot.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
    /// A restore handed the device its queues again (after `activate`):
    /// tell the driver what did not survive.
    fn restored(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Runs `f` with the device's active state taken out of `slot` for the
/// call, so that `f` may borrow the rest of the device mutably; nothing to
/// do while the device is not active.
pub fn with_active<D>(
    dev: &mut D,
    slot: fn(&mut D) -> &mut Option<Active>,
    f: impl FnOnce(&mut D, &mut Active) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    let Some(mut a) = slot(dev).take() else {
        return Ok(());
    };
    let r = f(dev, &mut a);
    *slot(dev) = Some(a);
    r
}

/// The next available chain. A corrupted avail ring is an error (the
/// device fails), not an empty queue.
pub fn pop_chain<'a>(
    q: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceError> {
    Ok(q.iter(mem)?.next())
}

/// Puts a chain in the used ring and notifies the driver if it wants it.
pub fn complete(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    q.add_used(mem, head, len)?;
    if q.needs_notification(mem)? {
        irq.signal_used();
    }
    Ok(())
}

/// The low 32 bits of a 64-bit register pair (feature words, queue
/// addresses as the MMIO transport splits them).
pub fn lo32(v: u64) -> u32 {
    let [a, b, c, d, ..] = v.to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

/// Bytes a device wrote into a chain, as the used ring records them:
/// bounded by the chain's buffers, whose lengths are 32-bit.
pub fn used_bytes(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Driving a device as a guest driver would: real guest memory, split
    //! rings at fixed addresses, chains built by hand.

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor as Raw};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    pub const QSIZE: u16 = 16;
    pub const F_WRITE: u16 = 2; // VRING_DESC_F_WRITE
    pub const F_NEXT: u16 = 1; // VRING_DESC_F_NEXT
    const _: () = assert!(F_WRITE as u32 == virtio_bindings::virtio_ring::VRING_DESC_F_WRITE);
    const _: () = assert!(F_NEXT as u32 == virtio_bindings::virtio_ring::VRING_DESC_F_NEXT);

    pub fn mem() -> GuestMemoryMmap {
        crate::memory::create(16).unwrap()
    }

    /// Where queue `i`'s rings live: 0x10000 * (i + 1); buffers go above
    /// 1 MiB. Creating one does not touch memory.
    pub struct Mock<'a> {
        mem: &'a GuestMemoryMmap,
        desc: u64,
        avail: u64,
        used: u64,
    }

    pub fn mock(mem: &GuestMemoryMmap, i: u64) -> Mock<'_> {
        let desc = 0x10000 * (i + 1);
        let avail = desc + 16 * u64::from(QSIZE);
        let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        Mock {
            mem,
            desc,
            avail,
            used,
        }
    }

    impl Mock<'_> {
        pub fn desc_table_addr(&self) -> GuestAddress {
            GuestAddress(self.desc)
        }
        pub fn avail_addr(&self) -> GuestAddress {
            GuestAddress(self.avail)
        }
        pub fn used_addr(&self) -> GuestAddress {
            GuestAddress(self.used)
        }
        /// The device side of this queue, ready, as a driver leaves it.
        pub fn create_queue(&self) -> Result<Queue, virtio_queue::Error> {
            let mut q = Queue::new(QSIZE)?;
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(lo32(self.desc)), Some(0));
            q.set_avail_ring_address(Some(lo32(self.avail)), Some(0));
            q.set_used_ring_address(Some(lo32(self.used)), Some(0));
            q.set_ready(true);
            Ok(q)
        }
    }

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Raw {
        Raw::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Publishes `descs` (already linked) as one chain starting at `head`.
    pub fn add_chain(q: &Mock<'_>, descs: &[(u16, Raw)], head: u16) {
        for (i, d) in descs {
            q.mem
                .write_obj(*d, GuestAddress(q.desc + 16 * u64::from(*i)))
                .unwrap();
        }
        let idx: u16 = q.mem.read_obj(GuestAddress(q.avail + 2)).unwrap();
        let slot = q.avail + 4 + 2 * u64::from(idx % QSIZE);
        q.mem.write_obj(head, GuestAddress(slot)).unwrap();
        q.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(q.avail + 2))
            .unwrap();
    }

    pub fn used_count(q: &Mock<'_>) -> u16 {
        q.mem.read_obj(GuestAddress(q.used + 2)).unwrap()
    }

    pub fn used_len(q: &Mock<'_>, i: u16) -> u32 {
        q.mem
            .read_obj(GuestAddress(q.used + 4 + 8 * u64::from(i % QSIZE) + 4))
            .unwrap()
    }

    pub fn active(mem: &GuestMemoryMmap, queues: Vec<Queue>, features: u64) -> (Active, Interrupt) {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        (
            Active {
                mem: mem.clone(),
                queues,
                irq: irq.clone(),
                kicks,
                features,
            },
            irq,
        )
    }

    pub fn write(mem: &GuestMemoryMmap, addr: u64, b: &[u8]) {
        mem.write_slice(b, GuestAddress(addr)).unwrap();
    }

    pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
