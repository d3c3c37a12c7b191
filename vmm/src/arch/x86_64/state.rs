//! A paused VM's KVM state, saved and put back: per vCPU its registers,
//! FPU/SSE/AVX (XSAVE), XCRs, debug registers, LAPIC, MSRs, multiprocessor
//! and pending-event state, and the CPU it ran on (CPUID, TSC frequency)
//! so that a host that differs is refused, not resumed on; per VM the PIC
//! pair, IOAPIC, PIT and kvmclock. The orders follow KVM's constraints
//! (Firecracker's are the model): the MP state is read first (it flushes
//! pending events), the LAPIC is set before the MSRs (the TSC deadline
//! needs the timer mode), the events last; the vCPUs are restored before
//! the VM's interrupt controllers, which may deliver to their LAPICs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::regs::msr_entry;
use serde::{Deserialize, Serialize};

/// The legacy XSAVE area this format holds; hosts whose guests may use
/// more (AMX) are refused rather than saved in part.
const XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// MSRs per KVM_GET_MSRS call.
const MSR_BATCH: usize = 64;
/// MSR_IA32_TSC_DEADLINE: set after the TSC it is relative to.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// How far a host's TSC frequency may be from the snapshot's before KVM
/// is asked to scale it (Firecracker's tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{ioctl}: {source}")]
    Kvm {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM restored {set} of the {saved} saved MSRs; it refused MSR {index:#x}")]
    Msrs {
        set: usize,
        saved: usize,
        index: u32,
    },
    #[error("this host's guests have {0} bytes of XSAVE state; snapshots hold {XSAVE_BYTES}")]
    Xsave(usize),
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf:#x} differs from the snapshot's: \
         another CPU, KVM or cpuid_hide than the one it was saved on"
    )]
    Cpuid { leaf: u32, subleaf: u32 },
    #[error(
        "the snapshot's TSC runs at {saved} kHz, this host's at {here} kHz, and KVM cannot scale it: {source}"
    )]
    Tsc {
        saved: u32,
        here: u32,
        source: kvm_ioctls::Error,
    },
}

fn kvm(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { ioctl, source }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets this vCPU read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The CPUID the vCPU had.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Its TSC frequency, where KVM tells it.
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs KVM saves and restores, as it lists them.
pub fn msr_list(k: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(k.get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Refuses hosts whose guest XSAVE state does not fit the format.
pub fn check_xsave(k: &Kvm) -> Result<(), StateError> {
    let size = usize::try_from(k.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    if size > XSAVE_BYTES {
        return Err(StateError::Xsave(size));
    }
    Ok(())
}

/// Reads what `fd` holds of `indices`: KVM stops a batch at the first MSR
/// it cannot read (one the vCPU's CPUID hides), which is then skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let batch = &indices[i..indices.len().min(i + MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|&i| msr_entry(i, 0)).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Kvm {
            ioctl: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        // Entry n, if the batch stopped short, is one KVM cannot read.
        i += if n < batch.len() { n + 1 } else { n };
    }
    Ok(out)
}

/// Saves a vCPU that has left KVM_RUN with its I/O completed.
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    Ok(VcpuState {
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// The new vCPU (its CPUID set from this host and the config) is the CPU
/// the snapshot ran on: the same CPUID, and a TSC of its frequency
/// (scaled by KVM where this host's differs).
fn check_cpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let here = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let regs = |e: &kvm_cpuid_entry2| (e.flags, e.eax, e.ebx, e.ecx, e.edx);
    let mut mine: Vec<&kvm_cpuid_entry2> = here.as_slice().iter().collect();
    mine.sort_by_key(|e| key(e));
    let mut saved: Vec<&kvm_cpuid_entry2> = s.cpuid.iter().collect();
    saved.sort_by_key(|e| key(e));
    for i in 0..mine.len().max(saved.len()) {
        let (a, b) = (mine.get(i), saved.get(i));
        if a.map(|e| (key(e), regs(e))) != b.map(|e| (key(e), regs(e))) {
            let (leaf, subleaf) = a.or(b).map_or((0, 0), |e| key(e));
            return Err(StateError::Cpuid { leaf, subleaf });
        }
    }
    if let (Some(saved), Ok(here)) = (s.tsc_khz, fd.get_tsc_khz()) {
        let off = u64::from(saved.abs_diff(here)) * 1_000_000;
        if off > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
            fd.set_tsc_khz(saved).map_err(|source| StateError::Tsc {
                saved,
                here,
                source,
            })?;
        }
    }
    Ok(())
}

/// Puts a saved state into a new vCPU (CPUID already set, and checked
/// against the snapshot's here).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    check_cpu(fd, s)?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `check_xsave` refused hosts whose XSAVE state is larger than
    // `kvm_xsave`, so KVM reads no more than the struct holds.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let mut entries: Vec<kvm_msr_entry> =
        s.msrs.iter().map(|&(i, data)| msr_entry(i, data)).collect();
    // The TSC deadline is relative to the TSC: set it after.
    entries.sort_by_key(|e| e.index == MSR_TSC_DEADLINE);
    for batch in entries.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch).map_err(|_| StateError::Kvm {
            ioctl: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != batch.len() {
            return Err(StateError::Msrs {
                set,
                saved: batch.len(),
                index: batch.get(set).map_or(0, |e| e.index),
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Saves the in-kernel interrupt controllers, PIT and clock.
pub fn save_platform(vm: &VmFd) -> Result<PlatformState, StateError> {
    Ok(PlatformState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Puts them back into a VM whose irqchip and PIT exist.
pub fn restore_platform(vm: &VmFd, s: &PlatformState) -> Result<(), StateError> {
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // No flags: the guest's clock goes on from the saved value, as after
    // a pause (KVM_CLOCK_REALTIME would jump it by the time since).
    let clock = kvm_clock_data {
        flags: 0,
        ..s.clock
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
