//! COM1 (an 8250/16550 UART from vm-superio): the guest console. Output
//! goes to a file or a pipe; interrupts reach the guest through an irqfd.
//! There is no console input: podvisor guests are reached over vsock.
//! Its registers are part of a snapshot ([`SerialSnapshot`]).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
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

/// The UART's registers and receive FIFO, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    pub fifo: Vec<u8>,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: Uart::new(IrqTrigger(irq), out),
            write_failed: false,
        }
    }

    /// A UART in a snapshot's state (an interrupt it had pending is
    /// raised again).
    pub fn restored(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        snap: &SerialSnapshot,
    ) -> Result<Serial, String> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = snap.registers;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: snap.fifo.clone(),
        };
        let uart = Uart::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Serial {
            uart,
            write_failed: false,
        })
    }

    /// Raises the interrupt again if the UART has one pending (after a
    /// restore: one raised before the interrupt controllers were restored
    /// was lost).
    pub fn retrigger(&self) {
        if self.uart.state().interrupt_identification & 1 == 0 {
            if let Err(e) = self.uart.interrupt_evt().trigger() {
                tracing::warn!("raising the serial interrupt: {e}");
            }
        }
    }

    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
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

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(3, &[0x03]); // LCR: 8N1
        s.write(7, &[0x5a]); // scratch
        let snap = s.save();
        let r =
            Serial::restored(irq.try_clone().unwrap(), Box::new(std::io::sink()), &snap).unwrap();
        assert_eq!(r.save(), snap);
        let mut scr = [0u8];
        let mut r = r;
        r.read(7, &mut scr);
        assert_eq!(scr[0], 0x5a);
        let too_full = SerialSnapshot {
            fifo: vec![0; 1000],
            ..snap
        };
        assert!(Serial::restored(irq, Box::new(std::io::sink()), &too_full).is_err());
    }
}
