//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2): the
//! register window a driver programs (features, queues, status), and the
//! hand-over of queues to the device on DRIVER_OK, and what a snapshot
//! keeps of both ([`TransportSnapshot`]).

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{lo32, Active, DeviceError, Interrupt, Queue, VirtioDevice, F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5056_4450; // "PDVP"

pub const REG_QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits a driver sets (virtio 1.x, 2.1).
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

/// A transport's registers and queues, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub name: String,
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub failed: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// One queue's layout and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> QueueSnapshot {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> QueueState {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Interrupt,
    kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    failed: bool,
    name: String,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("name", &self.name)
            .field("status", &self.status)
            .field("active", &self.active)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// `irq` is the device's irqfd; one notify eventfd per queue is created
    /// here (the VM registers them with KVM as ioeventfds).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
        name: String,
    ) -> Result<MmioTransport, DeviceError> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for max in device.queue_max_sizes() {
            queues.push(Queue::new(max)?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            irq: Interrupt::new(irq),
            kicks,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            failed: false,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The notify eventfds, one per queue, in queue order.
    pub fn kick_eventfds(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn handles_kicks(&self) -> bool {
        self.device.handles_kicks()
    }

    pub fn device_fds(&self) -> Vec<RawFd> {
        self.device.fds()
    }

    pub fn is_active(&self) -> bool {
        self.active && !self.failed
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// Queue `index` was kicked (through its ioeventfd).
    pub fn kick(&mut self, index: usize) {
        if let Some(k) = self.kicks.get(index) {
            let _ = k.read();
        }
        if self.is_active() {
            let r = self.device.queue_event(index);
            self.check(r);
        }
    }

    /// `device_fds()[index]` is ready.
    pub fn fd_ready(&mut self, index: usize) {
        if self.is_active() {
            let r = self.device.fd_event(index);
            self.check(r);
        }
    }

    /// A device error fails the device until the driver resets it.
    fn check(&mut self, r: Result<(), DeviceError>) {
        if let Err(e) = r {
            tracing::warn!("{}: {e}; device needs reset", self.name);
            self.failed = true;
            self.status |= S_NEEDS_RESET;
            self.irq.signal_config();
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.failed = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.irq.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & !S_NEEDS_RESET;
        let newly = v & !self.status;
        if newly & S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                tracing::warn!(
                    "{}: driver features {:#x} not a modern subset of {offered:#x}",
                    self.name,
                    self.driver_features
                );
                v &= !S_FEATURES_OK;
            }
        }
        self.status = v | (self.status & S_NEEDS_RESET);
        if newly & S_DRIVER_OK != 0 && !self.active {
            if v & (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
                != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
                || v & S_FAILED != 0
            {
                tracing::warn!("{}: DRIVER_OK out of order (status {v:#x})", self.name);
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let r = self
            .hand_over()
            .and_then(|active| self.device.activate(active));
        self.active = true;
        self.check(r);
    }

    /// What the device gets on activation: its queues (each checked to
    /// fit in guest memory) and their notify eventfds.
    fn hand_over(&self) -> Result<Active, DeviceError> {
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(DeviceError::Chain(format!(
                    "queue {i} does not fit in guest memory"
                )));
            }
            queues.push(Queue::try_from(q.state())?);
        }
        let kicks = self
            .kicks
            .iter()
            .map(|k| k.try_clone())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Active {
            mem: self.mem.clone(),
            queues,
            irq: self.irq.clone(),
            kicks,
            features: self.driver_features,
        })
    }

    /// The transport and its queues for a snapshot, or why the device
    /// cannot be saved now.
    pub fn save(&self) -> Result<TransportSnapshot, String> {
        if let Some(why) = self.device.snapshot_blocker() {
            return Err(format!("{}: {why}", self.name));
        }
        Ok(TransportSnapshot {
            name: self.name.clone(),
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            active: self.active,
            failed: self.failed,
            // A live device moves its own copies of the queues.
            queues: self
                .device
                .active()
                .map_or(&self.queues, |a| &a.queues)
                .iter()
                .map(|q| q.state().into())
                .collect(),
        })
    }

    /// Puts a saved transport back (guest memory already restored): the
    /// same device in the same slot, its queues where the driver left
    /// them, a live device handed its queues again.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        let name = self.name.clone();
        let fail = |what: String| format!("{name}: {what}");
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(fail(format!(
                "the snapshot has device type {} with {} queues here ({}), the config type {} with {}",
                s.device_type,
                s.queues.len(),
                s.name,
                self.device.device_type(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::new();
        for (i, (saved, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(fail(format!(
                    "queue {i} holds {} entries at most, not {}",
                    q.max_size(),
                    saved.max_size
                )));
            }
            queues.push(
                Queue::try_from(QueueState::from(*saved))
                    .map_err(|e| fail(format!("queue {i}: {e}")))?,
            );
        }
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.config_generation = s.config_generation;
        self.irq.ack(u32::MAX);
        self.irq.set(s.interrupt_status);
        self.failed = s.failed;
        if s.active && !s.failed {
            let active = self.hand_over().map_err(|e| fail(e.to_string()))?;
            self.device
                .activate(active)
                .map_err(|e| fail(e.to_string()))?;
            self.active = true;
            self.device.restored().map_err(|e| fail(e.to_string()))?;
        }
        self.active = s.active;
        // An interrupt the driver had not acknowledged: raised again (the
        // controllers may not hold it; a spurious one is harmless).
        if self.irq.status() != 0 {
            if let Err(e) = self.irq.irqfd().write(1) {
                tracing::warn!("{name}: raising its interrupt after a restore: {e}");
            }
        }
        Ok(())
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_select {
                0 => lo32(features),
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            // No shared memory regions: SHMLen and SHMBase read as all ones
            // (virtio-fs then runs without a DAX window).
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout may change only while the device is not live.
        let queue_reg = matches!(offset, 0x38 | 0x44 | 0x80..=0xa4);
        if queue_reg && self.active {
            tracing::debug!(
                "{}: queue register {offset:#x} written while live; ignored",
                self.name
            );
            return;
        }
        match offset {
            0x14 => self.device_features_select = v,
            0x20 => {
                if self.status & S_FEATURES_OK == 0 {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => {
                if let Some(q) = self.selected() {
                    // A size beyond 16 bits is no size: the queue then
                    // fails its checks when the driver enables it.
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            0x44 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Only reached when the ioeventfd is not registered.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!("{}: write to unknown register {offset:#x}", self.name),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let config = self.device.config();
            let start = usize::try_from(offset - CONFIG_SPACE).unwrap_or(usize::MAX);
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|j| config.get(j))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "{}: {}-byte register write at {offset:#x} ignored",
                self.name,
                data.len()
            );
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{complete, pop_chain};
    use std::sync::{Arc, Mutex};

    /// A device that completes every chain of queue 0 with length 1, and
    /// fails when asked to.
    pub struct Dummy {
        pub active: Option<Active>,
        pub log: Arc<Mutex<Vec<String>>>,
        pub fail: bool,
    }

    impl VirtioDevice for Dummy {
        fn active(&self) -> Option<&Active> {
            self.active.as_ref()
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![QSIZE, QSIZE]
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1
        }
        fn config(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5]
        }
        fn activate(&mut self, a: Active) -> Result<(), DeviceError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("activate {:#x} {}", a.features, a.queues.len()));
            self.active = Some(a);
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
            self.active = None;
        }
        fn queue_event(&mut self, i: usize) -> Result<(), DeviceError> {
            if self.fail {
                return Err(DeviceError::Chain("told to fail".into()));
            }
            let a = self.active.as_mut().unwrap();
            while let Some(c) = pop_chain(&mut a.queues[i], &a.mem)? {
                complete(&mut a.queues[i], &a.mem, &a.irq, c.head_index(), 1)?;
            }
            Ok(())
        }
    }

    pub fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Programs every queue of `t` at the mock layout and sets DRIVER_OK,
    /// as Linux's virtio_mmio driver does.
    pub fn drive(t: &mut MmioTransport, mem: &GuestMemoryMmap, features: u64) {
        wr(t, 0x70, S_ACKNOWLEDGE);
        wr(t, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, lo32(features));
        wr(t, 0x24, 1);
        wr(t, 0x20, (features >> 32) as u32);
        wr(t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(rd(t, 0x70) & S_FEATURES_OK, 0, "features refused");
        for i in 0..t.queues.len() {
            let m = mock(mem, i as u64);
            wr(t, 0x30, u32::try_from(i).unwrap());
            assert_eq!(rd(t, 0x34), u32::from(QSIZE));
            wr(t, 0x38, u32::from(QSIZE));
            for (reg, a) in [
                (0x80, m.desc_table_addr()),
                (0x90, m.avail_addr()),
                (0xa0, m.used_addr()),
            ] {
                wr(t, reg, lo32(a.0));
                wr(t, reg + 4, (a.0 >> 32) as u32);
            }
            wr(t, 0x44, 1);
        }
        wr(
            t,
            0x70,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    fn transport(fail: bool) -> (MmioTransport, GuestMemoryMmap, Arc<Mutex<Vec<String>>>) {
        let mem = mem();
        let log = Arc::new(Mutex::new(vec![]));
        let d = Dummy {
            active: None,
            log: log.clone(),
            fail,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            MmioTransport::new(Box::new(d), mem.clone(), irq, "dummy".into()).unwrap(),
            mem,
            log,
        )
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = transport(false);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 42);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
        let mut b = [0u8; 2];
        t.read(0x103, &mut b);
        assert_eq!(b, [4, 5]);
        t.read(0x105, &mut b);
        assert_eq!(b, [0, 0], "past the config space reads zero");
        wr(&mut t, 0xac, 0);
        assert_eq!(
            (rd(&mut t, 0xb0), rd(&mut t, 0xb4)),
            (u32::MAX, u32::MAX),
            "no shared memory region"
        );
        t.read(u64::MAX - 1, &mut b);
    }

    #[test]
    fn driver_ok_activates_and_kicks_complete_chains() {
        let (mut t, mem, log) = transport(false);
        drive(&mut t, &mem, F_VERSION_1 | 1);
        assert!(t.is_active());
        assert_eq!(
            log.lock().unwrap()[0],
            format!("activate {:#x} 2", F_VERSION_1 | 1)
        );
        let m = mock(&mem, 0);
        add_chain(&m, &[(0, desc(0x100000, 8, F_WRITE, 0))], 0);
        t.kick(0);
        assert_eq!(used_count(&m), 1);
        assert_eq!(rd(&mut t, 0x60), 1, "used-buffer interrupt");
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
        // Live queues cannot be moved.
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x80, 0x999);
        assert_eq!(t.queues[0].desc_table(), m.desc_table_addr().0);
        // Reset.
        wr(&mut t, 0x70, 0);
        assert!(!t.is_active());
        assert_eq!(log.lock().unwrap()[1], "reset");
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    /// A transport restored from a snapshot taken after the device had
    /// used two chains goes on at the third: its ring positions are the
    /// device's, not those of the activation.
    #[test]
    fn snapshot_keeps_ring_positions_and_restore_goes_on_from_them() {
        let (mut t, mem, _) = transport(false);
        drive(&mut t, &mem, F_VERSION_1 | 1);
        let m = mock(&mem, 0);
        for i in 0..2u16 {
            add_chain(&m, &[(i, desc(0x100000, 8, F_WRITE, 0))], i);
        }
        t.kick(0);
        assert_eq!(used_count(&m), 2);
        let snap = t.save().unwrap();
        assert_eq!(
            (snap.queues[0].next_avail, snap.queues[0].next_used),
            (2, 2)
        );
        assert!(snap.active && snap.interrupt_status & 1 == 1);

        let (mut r, _, log) = transport(false);
        // The restored device shares guest memory with the first (as a
        // restored VM's memory holds the saved rings).
        r.mem = mem.clone();
        r.restore(&snap).unwrap();
        assert!(r.is_active());
        assert_eq!(
            log.lock().unwrap()[0],
            format!("activate {:#x} 2", F_VERSION_1 | 1)
        );
        assert_eq!(r.save().unwrap(), snap);
        add_chain(&m, &[(2, desc(0x100000, 8, F_WRITE, 0))], 2);
        r.kick(0);
        assert_eq!(used_count(&m), 3, "the third chain, used once");
        assert!(r.is_active());

        // Another device in the slot is refused, naming both.
        let mut other = snap.clone();
        other.device_type = 2;
        let (mut x, _, _) = transport(false);
        let e = x.restore(&other).unwrap_err();
        assert!(e.contains("device type 2") && e.contains("type 42"), "{e}");
    }

    #[test]
    fn legacy_or_unknown_features_are_refused() {
        let (mut t, _, _) = transport(false);
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x20, 1); // no VERSION_1
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & S_FEATURES_OK, 0);
        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1 | 0x8000); // VERSION_1 and a bit never offered
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & S_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not activate.
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
        assert!(!t.is_active());
    }

    #[test]
    fn queue_outside_ram_fails_the_device_at_driver_ok() {
        let (mut t, mem, log) = transport(false);
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, u32::from(QSIZE));
        wr(&mut t, 0x80, 0xffff_f000);
        wr(&mut t, 0x84, 0x7);
        wr(&mut t, 0x44, 1);
        wr(
            &mut t,
            0x70,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert!(!t.is_active());
        assert_ne!(rd(&mut t, 0x70) & S_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & 2, 0, "config interrupt");
        assert!(log.lock().unwrap().is_empty());
        // A reset clears the failure and the device can be driven again.
        wr(&mut t, 0x70, 0);
        drive(&mut t, &mem, F_VERSION_1);
        assert!(t.is_active());
    }

    #[test]
    fn device_error_sets_needs_reset_and_stops_delivery() {
        let (mut t, mem, _) = transport(true);
        drive(&mut t, &mem, F_VERSION_1);
        t.kick(0);
        assert_ne!(rd(&mut t, 0x70) & S_NEEDS_RESET, 0);
        assert!(!t.is_active());
        t.kick(0); // ignored, no panic
    }

    #[test]
    fn junk_accesses_are_ignored() {
        let (mut t, _, _) = transport(false);
        t.write(0x70, &[1, 2]);
        t.write(0x71, &[0; 4]);
        wr(&mut t, 0x30, 99); // no such queue
        wr(&mut t, 0x38, 8);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x34), 0);
        wr(&mut t, REG_QUEUE_NOTIFY, 1000);
        wr(&mut t, 0x5000, 1);
        let mut odd = [0u8; 3];
        t.read(0, &mut odd);
        assert_eq!(odd, [0; 3]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }
}
