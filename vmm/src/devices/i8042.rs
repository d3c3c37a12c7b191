//! Enough of the i8042 PS/2 controller for Linux to probe it and for
//! `reboot=k` to end the VM: command 0xFE (pulse reset) or writing the
//! output port with the reset line low triggers [`ExitReason::Reboot`].
//! There is no keyboard behind it.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

const DATA: u64 = 0;
const CMD: u64 = 4;
const STATUS_OUT_FULL: u8 = 1;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_CMD: u8 = 1 << 3;

#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
    out: VecDeque<u8>,
    control: u8,
    /// The controller command waiting for its data byte.
    pending: Option<u8>,
    last_was_cmd: bool,
}

/// The controller's state, as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    pub control: u8,
    pub out: Vec<u8>,
    pub pending: Option<u8>,
    pub last_was_cmd: bool,
}

impl I8042 {
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            control: self.control,
            out: self.out.iter().copied().collect(),
            pending: self.pending,
            last_was_cmd: self.last_was_cmd,
        }
    }

    pub fn restore(&mut self, s: &I8042Snapshot) {
        self.control = s.control;
        self.out = s.out.iter().copied().collect();
        self.pending = s.pending;
        self.last_was_cmd = s.last_was_cmd;
    }

    pub fn new(exit: Arc<ExitSignal>) -> I8042 {
        I8042 {
            exit,
            out: VecDeque::new(),
            control: 0x61,
            pending: None,
            last_was_cmd: false,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.out.push_back(self.control),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(cmd),
            0xaa => self.out.push_back(0x55), // self test passed
            0xab => self.out.push_back(0x00), // keyboard interface ok
            0xad => self.control |= 0x10,
            0xae => self.control &= !0x10,
            0xa7 | 0xa8 => {}
            0xc0 => self.out.push_back(0),
            0xfe => self.exit.trigger(ExitReason::Reboot),
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(0x60) => self.control = v,
            // Output port, bit 0 is the CPU reset line (active low).
            Some(0xd1) if v & 1 == 0 => self.exit.trigger(ExitReason::Reboot),
            Some(0xd2) => self.out.push_back(v),
            Some(_) => {}
            // A byte for the keyboard: acknowledge it (and answer reset).
            None => {
                self.out.push_back(0xfa);
                if v == 0xff {
                    self.out.push_back(0xaa);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            DATA => self.out.pop_front().unwrap_or(0),
            CMD => {
                let mut s = STATUS_SYSTEM;
                if !self.out.is_empty() {
                    s |= STATUS_OUT_FULL;
                }
                if self.last_was_cmd {
                    s |= STATUS_CMD;
                }
                s
            }
            _ => 0xff,
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            DATA => {
                self.last_was_cmd = false;
                self.data(v);
            }
            CMD => {
                self.last_was_cmd = true;
                self.command(v);
            }
            _ => {}
        }
        // A misbehaving guest cannot grow the buffer without bound.
        while self.out.len() > 16 {
            self.out.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn state_round_trips() {
        let (mut d, _) = dev();
        d.write(CMD, &[0x60]);
        d.write(DATA, &[0x47]);
        d.write(CMD, &[0x20]);
        let snap = d.save();
        let (mut e, _) = dev();
        e.restore(&snap);
        assert_eq!(e.save(), snap);
        assert_eq!(rd(&mut e, DATA), 0x47);
    }

    #[test]
    fn pulse_reset_reboots() {
        let (mut d, exit) = dev();
        d.write(CMD, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn output_port_reset_line_reboots() {
        let (mut d, exit) = dev();
        d.write(CMD, &[0xd1]);
        d.write(DATA, &[0x01]);
        assert!(!exit.is_set());
        d.write(CMD, &[0xd1]);
        d.write(DATA, &[0x00]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn probe_sequence_answers_like_a_controller() {
        let (mut d, exit) = dev();
        assert_eq!(rd(&mut d, CMD) & STATUS_OUT_FULL, 0);
        d.write(CMD, &[0xaa]);
        assert_ne!(rd(&mut d, CMD) & STATUS_OUT_FULL, 0);
        assert_eq!(rd(&mut d, DATA), 0x55);
        d.write(CMD, &[0x60]);
        d.write(DATA, &[0x47]);
        d.write(CMD, &[0x20]);
        assert_eq!(rd(&mut d, DATA), 0x47);
        d.write(DATA, &[0xff]);
        assert_eq!((rd(&mut d, DATA), rd(&mut d, DATA)), (0xfa, 0xaa));
        // Junk: unknown commands, odd offsets, empty writes, a flood.
        for _ in 0..100 {
            d.write(DATA, &[0x12]);
        }
        d.write(CMD, &[0x99]);
        d.write(2, &[1]);
        d.write(DATA, &[]);
        assert!(d.out.len() <= 16);
        assert!(!exit.is_set());
    }
}
