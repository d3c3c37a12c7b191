//! Devices and the buses they sit on. A vCPU's port-I/O or MMIO exit is
//! routed by [`Bus`] to the device owning that address; an access that
//! hits nothing reads as all ones and is otherwise ignored.
//!
//! - [`serial`]: COM1, the guest console.
//! - [`i8042`]: enough of the PS/2 controller for `reboot=k`.
//! - [`acpi_pm`]: the ACPI sleep/reset register (power-off, reset).
//! - [`virtio`]: the virtio-mmio transport and the virtio devices.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct BusOverlap {
    pub base: u64,
    pub len: u64,
}

/// Address ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .devices
            .iter()
            .map(|(base, (len, _))| format!("{base:#x}+{len:#x}"))
            .collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).ok_or(BusOverlap { base, len })?;
        if len == 0
            || self
                .devices
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        {
            return Err(BusOverlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// False when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                match dev.lock() {
                    Ok(mut d) => d.read(off, data),
                    Err(_) => data.fill(0xff),
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// False when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                if let Ok(mut d) = dev.lock() {
                    d.write(off, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        let d = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x100, 8, d.clone()).unwrap();
        assert!(bus.insert(0x104, 8, d.clone()).is_err());
        assert!(bus.insert(0xfc, 8, d.clone()).is_err());
        assert!(bus.insert(0x108, 8, d.clone()).is_ok());
        assert!(bus.insert(u64::MAX, 2, d.clone()).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x200, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x10a, &[9]));
        assert!(!bus.write(0x99, &[9]));
        assert_eq!(d.lock().unwrap().0, vec![(2, 9)]);
    }
}
