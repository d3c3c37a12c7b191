//! COM1 (an 8250/16550 UART from vm-superio): the guest console. Output
//! goes to a file or a pipe; interrupts reach the guest through an irqfd.
//! There is no console input: podvisor guests are reached over vsock.

use std::io::Write;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Raises the serial IRQ by writing the irqfd KVM routes to the IOAPIC.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    write_failed: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("write_failed", &self.write_failed)
            .finish_non_exhaustive()
    }
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: Uart::new(IrqTrigger(irq), out),
            write_failed: false,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match u8::try_from(offset) {
            Ok(reg) if reg < 8 => self.uart.read(reg),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&v), Ok(reg @ 0..8)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(reg, v) {
            if !self.write_failed {
                tracing::warn!("console output failed (further failures not logged): {e:?}");
                self.write_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Out-of-range offsets are ignored, not a panic.
        s.write(100, &[1]);
        s.write(0, &[]);
        let mut wide = [0u8; 4];
        s.read(9, &mut wide);
        assert_eq!(wide[0], 0xff);
    }
}
