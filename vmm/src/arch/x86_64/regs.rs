//! A vCPU's starting state: 64-bit long mode with identity-mapped page
//! tables and a flat GDT (the Linux 64-bit boot protocol), boot MSRs,
//! FPU defaults, and LAPIC LINT0/LINT1 wired as ExtINT/NMI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT, BOOT_IDT, BOOT_STACK, IDENTITY_MAPPED_GIB, PD, PDPT, PML4, ZERO_PAGE,
};
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{ioctl}: {source}")]
    Kvm {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { ioctl, source }
}

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR `index` with value `data`, as KVM_GET/SET_MSRS take it.
pub fn msr_entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// A GDT descriptor from its flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// Null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment a GDT entry describes.
fn segment(index: u16, e: u64) -> kvm_segment {
    let limit = ((e >> 32) & 0x000f_0000) as u32 | (e & 0xffff) as u32;
    let g = ((e >> 55) & 1) as u8;
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 32) & 0xff00_0000) | ((e >> 16) & 0x00ff_ffff),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first
/// [`IDENTITY_MAPPED_GIB`] GiB. Once per VM; every vCPU shares them.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |what, v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|source| RegsError::Memory { what, source })
    };
    for (i, e) in GDT.iter().enumerate() {
        w("GDT", *e, BOOT_GDT + 8 * i as u64)?;
    }
    w("IDT", 0, BOOT_IDT)?;
    w("PML4", PDPT | 3, PML4)?;
    for g in 0..IDENTITY_MAPPED_GIB {
        let pd = PD + g * 0x1000;
        w("PDPT", pd | 3, PDPT + g * 8)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            w("PD", (((g << 9) + i) << 21) | 0x83, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Long mode, flat segments, paging on the identity tables.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut s = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    s.gdt.base = BOOT_GDT;
    s.gdt.limit = const {
        assert!(std::mem::size_of::<[u64; 4]>() == std::mem::size_of_val(&GDT));
        #[allow(clippy::cast_possible_truncation)] // 31
        let limit = (std::mem::size_of::<[u64; 4]>() - 1) as u16;
        limit
    };
    s.idt.base = BOOT_IDT;
    s.idt.limit = 7;
    let data = segment(2, GDT[2]);
    s.cs = segment(1, GDT[1]);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(3, GDT[3]);
    s.cr3 = PML4;
    s.cr4 |= CR4_PAE;
    s.cr0 |= CR0_PE | CR0_PG;
    s.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))
}

/// Entry point, boot stack, and `rsi` pointing at the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// MSRs as the boot protocol expects them: syscall MSRs cleared, fast
/// strings on, MTRRs enabled with write-back as the default type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries: Vec<kvm_msr_entry> = [
        (0x174, 0),                       // IA32_SYSENTER_CS
        (0x175, 0),                       // IA32_SYSENTER_ESP
        (0x176, 0),                       // IA32_SYSENTER_EIP
        (0xc000_0081, 0),                 // STAR
        (0xc000_0082, 0),                 // LSTAR
        (0xc000_0083, 0),                 // CSTAR
        (0xc000_0084, 0),                 // SYSCALL_MASK
        (0xc000_0102, 0),                 // KERNEL_GS_BASE
        (0x10, 0),                        // IA32_TSC
        (0x1a0, MISC_ENABLE_FAST_STRING), // IA32_MISC_ENABLE
        (0x2ff, (1 << 11) | 6),           // MTRRdefType: enabled, WB
    ]
    .iter()
    .map(|&(index, data)| msr_entry(index, data))
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// On AMD, HWCR.TscFreqSel (bit 24): the TSC counts at the P0 frequency,
/// as firmware leaves it. Without it Linux warns "[Firmware Bug]: TSC
/// doesn't count with P0 frequency!" (QEMU sets it too). A host KVM that
/// refuses the bit costs only that warning, so a refusal is logged, not an
/// error.
pub fn setup_amd_hwcr(vcpu: &VcpuFd) {
    const MSR_K7_HWCR: u32 = 0xc001_0015;
    const TSC_FREQ_SEL: u64 = 1 << 24;
    let hwcr = kvm_msr_entry {
        index: MSR_K7_HWCR,
        data: TSC_FREQ_SEL,
        ..Default::default()
    };
    let written = Msrs::from_entries(&[hwcr])
        .ok()
        .and_then(|m| vcpu.set_msrs(&m).ok());
    if written != Some(1) {
        tracing::debug!("KVM refused HWCR.TscFreqSel; the guest may warn about its TSC");
    }
}

/// LINT0 as ExtINT (the legacy PIC), LINT1 as NMI, as firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const LVT0: usize = 0x350;
    const LVT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(LVT0, EXTINT), (LVT1, NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[reg + i].to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = i8::from_ne_bytes([*x]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_long_mode_code_and_flat_data() {
        let cs = segment(1, GDT[1]);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2, GDT[2]);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let tr = segment(3, GDT[3]);
        assert_eq!((tr.type_, tr.s, tr.g), (0xb, 0, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = crate::memory::create(16).unwrap();
        write_boot_tables(&mem).unwrap();
        let r = |a| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4), PDPT | 3);
        assert_eq!(r(PDPT + 3 * 8), (PD + 0x3000) | 3);
        // Last 2 MiB page of the 4th GiB maps itself: the LAPIC lives there.
        assert_eq!(r(PD + 0x3000 + 511 * 8), (((3u64 << 9) + 511) << 21) | 0x83);
        assert_eq!(r(BOOT_GDT + 8), GDT[1]);
    }
}
