//! Does `/dev/kvm` run guest code at hardware speed?
//!
//! A nested or emulating `/dev/kvm` can exist and still run guest
//! kernel-mode code a thousand times slower than the hardware (this
//! project's CI hosts: under 1 MIPS), too slow to boot Linux. The probe
//! runs a counted loop in a one-page real-mode guest and times it.

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};

/// Loop iterations; two instructions each.
const ITERATIONS: u32 = 200_000;

const GUEST_ADDR: usize = 0x1000;
const MEM_SIZE: usize = 0x4000;

pub use podvisor_vmm_config::probe::Verdict;

/// `mov ecx, ITERATIONS; l: dec ecx; jnz l; hlt` in 16-bit real mode.
fn guest_code() -> Vec<u8> {
    let mut code = vec![0x66, 0xB9];
    code.extend_from_slice(&ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xFC, 0xF4]);
    code
}

/// Runs the probe guest once.
pub fn probe() -> Verdict {
    match run_loop() {
        Ok(elapsed) => {
            Verdict::from_mips(2.0 * f64::from(ITERATIONS) / elapsed.as_secs_f64().max(1e-9) / 1e6)
        }
        Err(why) => Verdict::Unavailable(why),
    }
}

fn run_loop() -> Result<Duration, String> {
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let mem = GuestPage::new()?;
    let code = guest_code();
    // SAFETY: `mem` is MEM_SIZE bytes and GUEST_ADDR + code fits inside.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.add(GUEST_ADDR), code.len());
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region stays mapped until `mem` drops, after the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: GUEST_ADDR as u64,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => return Err(format!("probe guest stopped unexpectedly: {other:?}")),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    let elapsed = start.elapsed();
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(elapsed)
}

/// Anonymous memory for the probe guest.
struct GuestPage {
    ptr: *mut u8,
}

impl GuestPage {
    fn new() -> Result<GuestPage, String> {
        // SAFETY: anonymous private mapping; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(GuestPage { ptr: ptr.cast() })
    }
}

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_loops_back_to_dec() {
        let c = guest_code();
        // jnz is at 8..10; its target (10 - 4) is the dec at offset 6.
        assert_eq!(&c[6..8], &[0x66, 0x49]);
        assert_eq!(i8::from_ne_bytes([c[9]]), -4);
        assert_eq!(*c.last().unwrap(), 0xF4);
    }

    /// Runs the real probe against /dev/kvm: whatever the verdict, it must
    /// come back (no hang, no panic) and say something sensible.
    #[test]
    fn probe_gives_a_verdict() {
        let v = probe();
        eprintln!("probe: {v}");
        match v {
            Verdict::Fast { mips } | Verdict::Slow { mips } => assert!(mips > 0.0),
            Verdict::Unavailable(why) => assert!(!why.is_empty()),
        }
    }
}
