//! A vCPU's state, described when the guest fails (triple fault, KVM
//! internal or emulation error, an exit the VMM does not expect), the way
//! QEMU's register dump does: RIP and the code bytes there, CPL, the
//! control registers and EFER, the general registers and segments. Read
//! with ioctls that cannot change the guest; every guest address is
//! checked, so a guest with garbage in its registers gets a report, not a
//! crash.

use std::fmt::Write;

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Code bytes shown from RIP on.
const CODE_BYTES: usize = 16;

/// The vCPU's registers and the code at RIP, over several lines.
pub fn describe(fd: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let mut out = String::new();
    let regs = match fd.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("registers unreadable (KVM_GET_REGS: {e})"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("RIP={:#018x} (KVM_GET_SREGS: {e})", regs.rip),
    };
    let _ = writeln!(
        out,
        "RIP={:#018x} RFL={:#010x} CPL={} CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
        regs.rip,
        regs.rflags,
        sregs.cs.selector & 3,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer
    );
    let _ = writeln!(
        out,
        "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
        regs.rax, regs.rbx, regs.rcx, regs.rdx
    );
    let _ = writeln!(
        out,
        "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
        regs.rsi, regs.rdi, regs.rbp, regs.rsp
    );
    let _ = writeln!(
        out,
        "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
        regs.r8, regs.r9, regs.r10, regs.r11
    );
    let _ = writeln!(
        out,
        "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
        regs.r12, regs.r13, regs.r14, regs.r15
    );
    for (name, s) in [("CS", &sregs.cs), ("SS", &sregs.ss), ("DS", &sregs.ds)] {
        let _ = writeln!(out, "{name} ={}", segment(s));
    }
    let _ = writeln!(
        out,
        "GDT={:#x}/{:#x} IDT={:#x}/{:#x}",
        sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit
    );
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let _ = write!(out, "Code at {linear:#x}: {}", code_at(fd, mem, linear));
    out
}

fn segment(s: &kvm_segment) -> String {
    format!(
        "{:04x} base={:#x} limit={:#x} type={:#x} dpl={} present={} l={} db={}",
        s.selector, s.base, s.limit, s.type_, s.dpl, s.present, s.l, s.db
    )
}

/// The bytes at guest-linear `linear`, translated by the vCPU's own page
/// tables (KVM_TRANSLATE), or why they cannot be shown.
fn code_at(fd: &VcpuFd, mem: &GuestMemoryMmap, linear: u64) -> String {
    let phys = match fd.translate_gva(linear) {
        Ok(t) if t.valid != 0 => t.physical_address,
        Ok(_) => return "not mapped by the guest's page tables".into(),
        Err(e) => return format!("untranslatable (KVM_TRANSLATE: {e})"),
    };
    let mut bytes = [0u8; CODE_BYTES];
    match mem.read_slice(&mut bytes, GuestAddress(phys)) {
        Ok(()) => hex(&bytes),
        Err(_) => format!("guest-physical {phys:#x} is not RAM"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What KVM says of a KVM_EXIT_INTERNAL_ERROR: its suberror by name and
/// the data words it passed.
pub fn internal_error(suberror: u32, data: &[u64]) -> String {
    let name = match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => {
            "the hardware exited for a reason KVM does not handle"
        }
        _ => "unknown suberror",
    };
    let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
    format!(
        "KVM internal error {suberror} ({name}); data [{}]",
        words.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_are_named_with_their_data() {
        let s = internal_error(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION, &[0x10, 0x2]);
        assert_eq!(
            s,
            "KVM internal error 1 (instruction emulation failed); data [0x10, 0x2]"
        );
        assert!(internal_error(99, &[]).contains("unknown suberror"));
    }

    #[test]
    fn hex_is_spaced_bytes() {
        assert_eq!(hex(&[0x0f, 0x0b, 0xf4]), "0f 0b f4");
    }
}
