//! The ACPI sleep control / reset register of the hardware-reduced FADT
//! (see `arch::acpi`): S5 powers the VM off, the reset value reboots it.

use std::sync::Arc;

use super::BusDevice;
use crate::arch::acpi::{RESET_VALUE, S5_SLEEP_VALUE};
use crate::exit::{ExitReason, ExitSignal};

#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>) -> AcpiPm {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&v)) if v == S5_SLEEP_VALUE => self.exit.trigger(ExitReason::PowerOff),
            (0, Some(&RESET_VALUE)) => self.exit.trigger(ExitReason::Reboot),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_reset_reboots_others_ignored() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut d = AcpiPm::new(exit.clone());
        d.write(0, &[0x14]); // S5 type without SLP_EN
        d.write(1, &[S5_SLEEP_VALUE]);
        d.write(0, &[]);
        assert!(!exit.is_set());
        d.write(0, &[S5_SLEEP_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut d = AcpiPm::new(exit.clone());
        d.write(0, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}
