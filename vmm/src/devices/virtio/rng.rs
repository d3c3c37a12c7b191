//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use std::io::Write;

use super::{
    complete, pop_chain, used_bytes, Active, DeviceError, VirtioDevice, F_VERSION_1, TYPE_RNG,
};

const QUEUE_SIZE: u16 = 256;
/// Largest chunk served per buffer; a guest asking for more gets this much.
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Default, Debug)]
pub struct Rng {
    active: Option<Active>,
}

impl Rng {
    pub fn new() -> Rng {
        Rng::default()
    }
}

fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn activate(&mut self, active: Active) -> Result<(), DeviceError> {
        self.active = Some(active);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let mut buf = vec![0u8; MAX_CHUNK];
        while let Some(chain) = pop_chain(&mut a.queues[0], &a.mem)? {
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::Chain(format!("rng buffer: {e}")))?;
            let n = w.available_bytes().min(MAX_CHUNK);
            fill(&mut buf[..n])?;
            w.write_all(&buf[..n])?;
            complete(&mut a.queues[0], &a.mem, &a.irq, head, used_bytes(n))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;

    fn setup(mem: &crate::memory::GuestMemoryMmap) -> (Rng, crate::devices::virtio::Interrupt) {
        let q = mock(mem, 0).create_queue().unwrap();
        let (a, irq) = active(mem, vec![q], F_VERSION_1);
        let mut r = Rng::new();
        r.activate(a).unwrap();
        (r, irq)
    }

    #[test]
    fn fills_buffers_with_random_bytes() {
        let mem = mem();
        let (mut r, irq) = setup(&mem);
        let m = mock(&mem, 0);
        add_chain(
            &m,
            &[
                (0, desc(0x200000, 64, F_WRITE | F_NEXT, 1)),
                (1, desc(0x300000, 64, F_WRITE, 0)),
            ],
            0,
        );
        r.queue_event(0).unwrap();
        assert_eq!(used_count(&m), 1);
        assert_eq!(used_len(&m, 0), 128);
        assert_ne!(read(&mem, 0x200000, 64), vec![0; 64]);
        assert_ne!(read(&mem, 0x300000, 64), vec![0; 64]);
        assert_ne!(irq.status() & 1, 0);
    }

    #[test]
    fn buffer_outside_ram_fails_the_device() {
        let mem = mem();
        let (mut r, _) = setup(&mem);
        let m = mock(&mem, 0);
        add_chain(&m, &[(0, desc(0x7fff_0000_0000, 64, F_WRITE, 0))], 0);
        assert!(r.queue_event(0).is_err());
    }

    #[test]
    fn looping_chain_terminates() {
        let mem = mem();
        let (mut r, _) = setup(&mem);
        let m = mock(&mem, 0);
        add_chain(
            &m,
            &[
                (0, desc(0x200000, 16, F_WRITE | F_NEXT, 1)),
                (1, desc(0x200100, 16, F_WRITE | F_NEXT, 0)),
            ],
            0,
        );
        // The chain is cut at the queue size; the device finishes.
        r.queue_event(0).unwrap();
        assert_eq!(used_count(&m), 1);
    }

    #[test]
    fn huge_length_is_capped_or_refused() {
        let mem = mem();
        let (mut r, _) = setup(&mem);
        let m = mock(&mem, 0);
        add_chain(&m, &[(0, desc(0x200000, u32::MAX, F_WRITE, 0))], 0);
        assert!(r.queue_event(0).is_err(), "4 GiB buffer in a 16 MiB guest");
    }
}
