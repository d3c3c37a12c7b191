//! A container's seccomp filter: the OCI `linux.seccomp` profile compiled
//! to classic BPF by the agent (no libseccomp), installed by the process
//! just before it execs.
//!
//! Semantics follow runc's use of libseccomp: the default action for
//! anything no rule matches; one rule per syscall entry, its argument
//! conditions ANDed (ORed when several test the same argument, as runc
//! does); a rule whose action is the default is dropped; a syscall name
//! that no listed architecture has is skipped for that architecture, and
//! one no architecture has at all is an error; an architecture the filter
//! does not list kills the process. Architectures: x86_64 (always), x86
//! and x32; others never reach an x86_64 guest and are ignored.
//!
//! Program shape, per architecture: one block per syscall number (its
//! conditional rules in profile order, then its unconditional rule or the
//! default), unconditional rules sharing one `ret` per action and chunk.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

use super::ChildError;
use crate::error::{invalid, Result};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
/// Classic BPF allows this many instructions per program.
const MAX_INSNS: usize = 4096;

// seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low word of argument `i` (0..6, as the OCI spec's index is).
fn off_arg_lo(i: usize) -> u32 {
    16 + 8 * u32::try_from(i.min(5)).unwrap_or(5)
}

/// A BPF opcode as `sock_filter` holds it; a compile error if it does not
/// fit (used in consts).
const fn op(code: u32) -> u16 {
    assert!(code <= u16::MAX as u32);
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let op = code as u16;
    op
}

/// The low and high words of a 64-bit argument value.
fn words(v: u64) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
    (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    )
}

// BPF opcodes.
const LD_W_ABS: u16 = op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
const JMP_JA: u16 = op(libc::BPF_JMP | libc::BPF_JA);
const JEQ_K: u16 = op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
const JGT_K: u16 = op(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K);
const JGE_K: u16 = op(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K);
const AND_K: u16 = op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K);
const RET_K: u16 = op(libc::BPF_RET | libc::BPF_K);

/// x32 system calls whose numbers differ from x86_64's (512 + n in the
/// kernel's syscall_64.tbl); every other x32 call is the x86_64 number
/// with [`X32_SYSCALL_BIT`] set.
const X32_SPECIFIC: [&str; 36] = [
    "rt_sigaction",
    "rt_sigreturn",
    "ioctl",
    "readv",
    "writev",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "execve",
    "ptrace",
    "rt_sigpending",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "sigaltstack",
    "timer_create",
    "mq_notify",
    "kexec_load",
    "waitid",
    "set_robust_list",
    "get_robust_list",
    "vmsplice",
    "move_pages",
    "preadv",
    "pwritev",
    "rt_tgsigqueueinfo",
    "recvmmsg",
    "sendmmsg",
    "process_vm_readv",
    "process_vm_writev",
    "setsockopt",
    "getsockopt",
    "io_setup",
    "io_submit",
    "execveat",
    "preadv2",
    "pwritev2",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Abi {
    X86_64,
    X32,
    X86,
}

impl Abi {
    fn number(self, name: &str) -> Option<u32> {
        match self {
            Abi::X86_64 => syscalls::x86_64::Sysno::from_str(name)
                .ok()
                .and_then(|s| u32::try_from(s.id()).ok()),
            Abi::X86 => syscalls::x86::Sysno::from_str(name)
                .ok()
                .and_then(|s| u32::try_from(s.id()).ok()),
            Abi::X32 => {
                if let Some(i) = X32_SPECIFIC.iter().position(|n| *n == name) {
                    return u32::try_from(512 + i).ok().map(|n| X32_SYSCALL_BIT | n);
                }
                // The 64-bit-only calls x32 replaced above have no x32 number.
                let n = Abi::X86_64.number(name)?;
                (n < 512).then_some(X32_SYSCALL_BIT | n)
            }
        }
    }

    /// Arguments are 64 bits wide on x86_64 and x32, 32 on x86.
    fn wide(self) -> bool {
        self != Abi::X86
    }
}

/// One compiled rule: its conditions (all must hold) and what it returns.
#[derive(Debug, Clone)]
struct Rule {
    conditions: Vec<LinuxSeccompArg>,
    ret: u32,
}

/// Whether some Linux architecture has a system call `name`.
fn any_arch_has(name: &str) -> bool {
    use syscalls::*;
    aarch64::Sysno::from_str(name).is_ok()
        || arm::Sysno::from_str(name).is_ok()
        || loongarch64::Sysno::from_str(name).is_ok()
        || mips::Sysno::from_str(name).is_ok()
        || mips64::Sysno::from_str(name).is_ok()
        || powerpc::Sysno::from_str(name).is_ok()
        || powerpc64::Sysno::from_str(name).is_ok()
        || riscv32::Sysno::from_str(name).is_ok()
        || riscv64::Sysno::from_str(name).is_ok()
        || s390x::Sysno::from_str(name).is_ok()
        || sparc::Sysno::from_str(name).is_ok()
        || sparc64::Sysno::from_str(name).is_ok()
}

/// The rules of one ABI by syscall number: its conditional rules in
/// profile order, and its unconditional one.
type Table = BTreeMap<u32, (Vec<Rule>, Option<u32>)>;

/// A compiled filter, ready to install.
#[derive(Debug)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
}

fn action(a: LinuxSeccompAction, errno: Option<u32>, what: &str) -> Result<u32> {
    if a == LinuxSeccompAction::ScmpActNotify {
        return Err(invalid!(
            "seccomp {what}: SCMP_ACT_NOTIFY needs a listener on the host, which a process in \
             the VM cannot reach"
        ));
    }
    if let Some(e) = errno {
        if e > 0xffff {
            return Err(invalid!("seccomp {what}: errnoRet {e} out of range"));
        }
    }
    Ok(a.as_u32(errno))
}

impl Filter {
    /// Compiles `profile`; errors name what the guest cannot do.
    pub fn compile(profile: &LinuxSeccomp) -> Result<Filter> {
        if profile
            .listener_path()
            .as_ref()
            .is_some_and(|p| !p.as_os_str().is_empty())
        {
            return Err(invalid!(
                "seccomp listenerPath {}: a seccomp agent on the host cannot serve a process \
                 in the VM",
                profile
                    .listener_path()
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ));
        }
        let default = action(
            profile.default_action(),
            profile.default_errno_ret(),
            "defaultAction",
        )?;
        let mut abis = vec![Abi::X86_64];
        for a in profile.architectures().iter().flatten() {
            let abi = match a {
                Arch::ScmpArchX86 => Abi::X86,
                Arch::ScmpArchX32 => Abi::X32,
                _ => continue,
            };
            if !abis.contains(&abi) {
                abis.push(abi);
            }
        }
        abis.sort();

        // Per ABI, per syscall number: its conditional rules in order,
        // then its first unconditional one.
        let mut tables: BTreeMap<Abi, Table> = BTreeMap::new();
        for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
            let what = format!("syscalls[{i}]");
            let ret = action(sc.action(), sc.errno_ret(), &what)?;
            let args = sc.args().clone().unwrap_or_default();
            for a in &args {
                if a.index() > 5 {
                    return Err(invalid!(
                        "seccomp {what}: argument index {} (a system call has 6, 0 to 5)",
                        a.index()
                    ));
                }
            }
            if ret == default {
                continue;
            }
            // As runc: conditions on one argument each make a rule (OR),
            // conditions on different arguments one rule (AND).
            let repeated = args
                .iter()
                .enumerate()
                .any(|(j, a)| args[..j].iter().any(|b| b.index() == a.index()));
            let rules: Vec<Vec<LinuxSeccompArg>> = if repeated {
                args.iter().map(|a| vec![*a]).collect()
            } else {
                vec![args]
            };
            for name in sc.names() {
                let mut known = false;
                for &abi in &[Abi::X86_64, Abi::X32, Abi::X86] {
                    let Some(nr) = abi.number(name) else { continue };
                    known = true;
                    if !abis.contains(&abi) {
                        continue;
                    }
                    let entry = tables.entry(abi).or_default().entry(nr).or_default();
                    for conditions in &rules {
                        if conditions.is_empty() {
                            entry.1.get_or_insert(ret);
                        } else {
                            entry.0.push(Rule {
                                conditions: conditions.clone(),
                                ret,
                            });
                        }
                    }
                }
                // Profiles list calls of other architectures too (recv,
                // arm_fadvise64_64): skipped here, as libseccomp does. A
                // name no architecture has is a mistake.
                if !known && !any_arch_has(name) {
                    return Err(invalid!(
                        "seccomp {what}: unknown system call {name:?} (no Linux architecture has it)"
                    ));
                }
            }
        }

        let mut asm = Asm::default();
        let mut entries = Vec::new();
        asm.stmt(LD_W_ABS, OFF_ARCH);
        let arches: Vec<(u32, Abi)> = [
            (AUDIT_ARCH_X86_64, Abi::X86_64),
            (AUDIT_ARCH_I386, Abi::X86),
        ]
        .into_iter()
        .filter(|(_, abi)| abis.contains(abi))
        .collect();
        for (audit, abi) in &arches {
            let entry = asm.label();
            asm.jump(JEQ_K, *audit, Some(entry), None)?;
            entries.push((*abi, entry));
        }
        asm.stmt(RET_K, SECCOMP_RET_KILL_PROCESS);
        let empty = BTreeMap::new();
        for (abi, entry) in entries {
            asm.bind(entry);
            asm.stmt(LD_W_ABS, OFF_NR);
            if abi == Abi::X86_64 {
                // x32 calls carry X32_SYSCALL_BIT under the x86_64 arch.
                if abis.contains(&Abi::X32) {
                    let x32 = asm.label();
                    asm.jump(JGE_K, X32_SYSCALL_BIT, Some(x32), None)?;
                    asm.syscalls(
                        Abi::X86_64,
                        tables.get(&Abi::X86_64).unwrap_or(&empty),
                        default,
                    )?;
                    asm.bind(x32);
                    asm.syscalls(Abi::X32, tables.get(&Abi::X32).unwrap_or(&empty), default)?;
                } else {
                    let native = asm.label();
                    asm.jump_near(JGE_K, X32_SYSCALL_BIT, None, Some(native));
                    asm.stmt(RET_K, SECCOMP_RET_KILL_PROCESS);
                    asm.bind(native);
                    asm.syscalls(
                        Abi::X86_64,
                        tables.get(&Abi::X86_64).unwrap_or(&empty),
                        default,
                    )?;
                }
            } else {
                asm.syscalls(abi, tables.get(&abi).unwrap_or(&empty), default)?;
            }
        }
        let program = asm.finish()?;

        let mut flags: libc::c_ulong = 0;
        for f in profile.flags().iter().flatten() {
            flags |= match f {
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 1,
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => 2,
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => 4,
                LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 32,
            };
        }
        Ok(Filter { program, flags })
    }

    /// Installs the filter on the calling thread. Needs no_new_privs or
    /// CAP_SYS_ADMIN.
    pub fn install(&self) -> Result<(), ChildError> {
        let len = u16::try_from(self.program.len()).map_err(|_| {
            ChildError(format!(
                "the seccomp filter has {} instructions; the kernel takes at most 4096",
                self.program.len()
            ))
        })?;
        let prog = libc::sock_fprog {
            len,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prog points at our program, alive for the call; the
        // kernel copies it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(ChildError(format!(
                "installing the seccomp filter: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.program.len()
    }
}

/// A forward-only BPF assembler with labels; jumps are resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
}

#[derive(Clone, Copy)]
struct Label(usize);

enum Insn {
    Stmt(u16, u32),
    /// Conditional jump: true and false targets (None: the next insn).
    Jump(u16, u32, Option<Label>, Option<Label>),
    /// Unconditional jump.
    Ja(Label),
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::Stmt(code, k));
    }

    /// A conditional jump; a far target goes through a `ja`.
    fn jump(&mut self, code: u16, k: u32, t: Option<Label>, f: Option<Label>) -> Result<()> {
        match (t, f) {
            (Some(t), None) => {
                // jt: skip the next insn, which jumps far; jf: fall through
                // past it.
                let past = self.label();
                self.insns.push(Insn::Jump(code, k, None, Some(past)));
                self.insns.push(Insn::Ja(t));
                self.bind(past);
            }
            (None, Some(f)) => {
                let past = self.label();
                self.insns.push(Insn::Jump(code, k, Some(past), None));
                self.insns.push(Insn::Ja(f));
                self.bind(past);
            }
            (t, f) => self.insns.push(Insn::Jump(code, k, t, f)),
        }
        Ok(())
    }

    /// A short conditional jump (both targets within 255 insns).
    fn jump_near(&mut self, code: u16, k: u32, t: Option<Label>, f: Option<Label>) {
        self.insns.push(Insn::Jump(code, k, t, f));
    }

    /// The rules of one ABI; the syscall number is in A on entry.
    fn syscalls(&mut self, abi: Abi, table: &Table, default: u32) -> Result<()> {
        // Plain rules first, grouped by action: a run of `jeq nr` sharing
        // one `ret`, in chunks the 8-bit jump offsets reach.
        let mut plain: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (nr, (conditional, unconditional)) in table {
            if let (true, Some(ret)) = (conditional.is_empty(), unconditional) {
                plain.entry(*ret).or_default().push(*nr);
            }
        }
        for (ret, nrs) in &plain {
            for chunk in nrs.chunks(200) {
                let hit = self.label();
                let miss = self.label();
                for nr in chunk {
                    self.jump_near(JEQ_K, *nr, Some(hit), None);
                }
                self.insns.push(Insn::Ja(miss));
                self.bind(hit);
                self.stmt(RET_K, *ret);
                self.bind(miss);
            }
        }
        // Syscalls with conditions: their own block each.
        for (nr, (conditional, unconditional)) in table {
            if conditional.is_empty() {
                continue;
            }
            let next = self.label();
            self.jump(JEQ_K, *nr, None, Some(next))?;
            for rule in conditional {
                let fail = self.label();
                for c in &rule.conditions {
                    self.condition(abi, c, fail);
                }
                self.stmt(RET_K, rule.ret);
                self.bind(fail);
            }
            self.stmt(RET_K, unconditional.unwrap_or(default));
            self.bind(next);
            // The conditions clobbered A: reload the number for the next
            // block.
            self.stmt(LD_W_ABS, OFF_NR);
        }
        self.stmt(RET_K, default);
        Ok(())
    }

    /// Falls through when `c` holds for the call, jumps to `fail` when not.
    fn condition(&mut self, abi: Abi, c: &LinuxSeccompArg, fail: Label) {
        let i = c.index();
        let (v_lo, v_hi) = words(c.value());
        let lo = off_arg_lo(i);
        let hi = lo + 4;
        let pass = self.label();
        if !abi.wide() {
            // 32-bit arguments: compare the low word only.
            self.stmt(LD_W_ABS, lo);
            match c.op() {
                LinuxSeccompOperator::ScmpCmpEq => self.jump_near(JEQ_K, v_lo, None, Some(fail)),
                LinuxSeccompOperator::ScmpCmpNe => self.jump_near(JEQ_K, v_lo, Some(fail), None),
                LinuxSeccompOperator::ScmpCmpGt => self.jump_near(JGT_K, v_lo, None, Some(fail)),
                LinuxSeccompOperator::ScmpCmpGe => self.jump_near(JGE_K, v_lo, None, Some(fail)),
                LinuxSeccompOperator::ScmpCmpLt => self.jump_near(JGE_K, v_lo, Some(fail), None),
                LinuxSeccompOperator::ScmpCmpLe => self.jump_near(JGT_K, v_lo, Some(fail), None),
                LinuxSeccompOperator::ScmpCmpMaskedEq => {
                    self.stmt(AND_K, v_lo);
                    let (want, _) = words(c.value_two().unwrap_or(0));
                    self.jump_near(JEQ_K, want, None, Some(fail));
                }
            }
            self.bind(pass);
            return;
        }
        match c.op() {
            LinuxSeccompOperator::ScmpCmpEq => {
                self.stmt(LD_W_ABS, hi);
                self.jump_near(JEQ_K, v_hi, None, Some(fail));
                self.stmt(LD_W_ABS, lo);
                self.jump_near(JEQ_K, v_lo, None, Some(fail));
            }
            LinuxSeccompOperator::ScmpCmpNe => {
                self.stmt(LD_W_ABS, hi);
                self.jump_near(JEQ_K, v_hi, None, Some(pass));
                self.stmt(LD_W_ABS, lo);
                self.jump_near(JEQ_K, v_lo, Some(fail), None);
            }
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                let want = c.value_two().unwrap_or(0);
                self.stmt(LD_W_ABS, hi);
                self.stmt(AND_K, v_hi);
                let (want_lo, want_hi) = words(want);
                self.jump_near(JEQ_K, want_hi, None, Some(fail));
                self.stmt(LD_W_ABS, lo);
                self.stmt(AND_K, v_lo);
                self.jump_near(JEQ_K, want_lo, None, Some(fail));
            }
            // Unsigned 64-bit order: the high words decide unless equal.
            op => {
                let (word_op, negate) = match op {
                    LinuxSeccompOperator::ScmpCmpGt => (JGT_K, false),
                    LinuxSeccompOperator::ScmpCmpGe => (JGE_K, false),
                    LinuxSeccompOperator::ScmpCmpLt => (JGE_K, true),
                    _ => (JGT_K, true), // Le
                };
                let (yes, no) = if negate { (fail, pass) } else { (pass, fail) };
                let low = self.label();
                self.stmt(LD_W_ABS, hi);
                self.jump_near(JGT_K, v_hi, Some(yes), None);
                self.jump_near(JEQ_K, v_hi, Some(low), Some(no));
                self.bind(low);
                self.stmt(LD_W_ABS, lo);
                self.jump_near(word_op, v_lo, Some(yes), Some(no));
            }
        }
        self.bind(pass);
    }

    fn finish(self) -> Result<Vec<libc::sock_filter>> {
        if self.insns.len() > MAX_INSNS {
            return Err(invalid!(
                "seccomp profile compiles to {} BPF instructions, more than the kernel's {MAX_INSNS}",
                self.insns.len()
            ));
        }
        let target = |l: &Label| -> Result<usize> {
            self.labels[l.0].ok_or_else(|| invalid!("seccomp compiler: unbound label"))
        };
        let mut out = Vec::with_capacity(self.insns.len());
        for (pc, insn) in self.insns.iter().enumerate() {
            let forward = |l: &Label| -> Result<usize> {
                target(l)?
                    .checked_sub(pc + 1)
                    .ok_or_else(|| invalid!("seccomp compiler: backward jump"))
            };
            let rel = |t: Option<&Label>| -> Result<u8> {
                let Some(l) = t else { return Ok(0) };
                let d = forward(l)?;
                u8::try_from(d).map_err(|_| invalid!("seccomp compiler: jump of {d} too far"))
            };
            out.push(match insn {
                Insn::Stmt(code, k) => libc::sock_filter {
                    code: *code,
                    jt: 0,
                    jf: 0,
                    k: *k,
                },
                Insn::Jump(code, k, t, f) => libc::sock_filter {
                    code: *code,
                    jt: rel(t.as_ref())?,
                    jf: rel(f.as_ref())?,
                    k: *k,
                },
                Insn::Ja(l) => libc::sock_filter {
                    code: JMP_JA,
                    jt: 0,
                    jf: 0,
                    k: u32::try_from(forward(l)?)
                        .map_err(|_| invalid!("seccomp compiler: jump too far"))?,
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    /// Runs `f` on the program for a call: a small classic-BPF
    /// interpreter over seccomp_data.
    fn run(f: &Filter, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = f.program[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                AND_K => a &= i.k,
                RET_K => return i.k,
                JMP_JA => pc += i.k as usize,
                code => {
                    let hit = match code {
                        JEQ_K => a == i.k,
                        JGT_K => a > i.k,
                        JGE_K => a >= i.k,
                        _ => panic!("unknown opcode {code:#x}"),
                    };
                    pc += if hit { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0001;

    #[test]
    fn default_and_plain_rules() {
        let f = Filter::compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","_llseek","recv","arm_fadvise64_64"],"action":"SCMP_ACT_ALLOW"},
                {"names":["chmod"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        ))
        .unwrap();
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 0, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 1, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 90, [0; 6]), 0x0005_0000 | 38);
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 2, [0; 6]), EPERM);
        // No x86 in the filter: that arch, and x32 calls, are killed.
        assert_eq!(
            run(&f, AUDIT_ARCH_I386, 3, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 1, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn architectures_use_their_own_numbers() {
        let f = Filter::compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO",
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[{"names":["execve","_llseek","getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        ))
        .unwrap();
        // execve: 59 on x86_64, 11 on x86, 520 on x32; _llseek is x86 only.
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 59, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_I386, 11, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_I386, 140, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 140, [0; 6]), EPERM);
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 520, [0; 6]),
            ALLOW
        );
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 59, [0; 6]),
            EPERM
        );
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 39, [0; 6]),
            ALLOW
        );
        assert_eq!(run(&f, 0xc000_00b7, 59, [0; 6]), SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn argument_conditions() {
        // personality(0 or 8) allowed (same argument: ORed), clone with a
        // namespace flag denied (masked), and 64-bit order on mmap's len.
        let f = Filter::compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
              {"names":["personality"],"action":"SCMP_ACT_ALLOW",
               "args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
              {"names":["clone"],"action":"SCMP_ACT_ALLOW",
               "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
              {"names":["mmap"],"action":"SCMP_ACT_ALLOW",
               "args":[{"index":1,"value":4294967296,"op":"SCMP_CMP_LT"},{"index":2,"value":1,"op":"SCMP_CMP_NE"}]},
              {"names":["dup"],"action":"SCMP_ACT_KILL_PROCESS",
               "args":[{"index":0,"value":4294967300,"op":"SCMP_CMP_GE"}]},
              {"names":["dup2"],"action":"SCMP_ACT_TRAP",
               "args":[{"index":0,"value":10,"op":"SCMP_CMP_GT"}]},
              {"names":["dup3"],"action":"SCMP_ACT_LOG",
               "args":[{"index":0,"value":10,"op":"SCMP_CMP_LE"}]}]}"#,
        ))
        .unwrap();
        let call = |nr, args| run(&f, AUDIT_ARCH_X86_64, nr, args);
        let personality = 135;
        assert_eq!(call(personality, [0, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(personality, [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(personality, [9, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(personality, [1 << 32, 0, 0, 0, 0, 0]), EPERM);
        let clone = 56;
        assert_eq!(call(clone, [0x11, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(clone, [0x1000_0000, 0, 0, 0, 0, 0]), EPERM);
        let mmap = 9;
        assert_eq!(call(mmap, [0, 4096, 3, 0, 0, 0]), ALLOW);
        assert_eq!(call(mmap, [0, 1 << 32, 3, 0, 0, 0]), EPERM);
        assert_eq!(call(mmap, [0, 4096, 1, 0, 0, 0]), EPERM);
        assert_eq!(call(mmap, [0, 4096, 1 | (1 << 32), 0, 0, 0]), ALLOW);
        let (dup, dup2, dup3) = (32, 33, 292);
        assert_eq!(
            call(dup, [4294967300, 0, 0, 0, 0, 0]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(call(dup, [4294967299, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            call(dup, [1 << 33, 0, 0, 0, 0, 0]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(call(dup2, [11, 0, 0, 0, 0, 0]), 0x0003_0000);
        assert_eq!(call(dup2, [10, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(dup3, [10, 0, 0, 0, 0, 0]), 0x7ffc_0000);
        assert_eq!(call(dup3, [1 << 32, 0, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn conditional_rules_come_before_the_plain_one() {
        let f = Filter::compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
              {"names":["sethostname"],"action":"SCMP_ACT_KILL_PROCESS"},
              {"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":1,
               "args":[{"index":1,"value":3,"op":"SCMP_CMP_EQ"}]},
              {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        ))
        .unwrap();
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 170, [0, 3, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, 170, [0, 4, 0, 0, 0, 0]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 39, [0; 6]), ALLOW);
    }

    #[test]
    fn a_large_profile_fits() {
        // Every x86_64 system call allowed, on all three ABIs.
        let names: Vec<String> = (0..460)
            .filter_map(|n| syscalls::x86_64::Sysno::new(n).map(|s| format!("{:?}", s.name())))
            .collect();
        let f = Filter::compile(&profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO",
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}}]}}"#,
            names.join(",")
        )))
        .unwrap();
        assert!(f.len() < 2000, "{}", f.len());
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 0, [0; 6]), ALLOW);
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, 459, [0; 6]), ALLOW);
    }

    #[test]
    fn the_kernel_takes_the_filter_and_enforces_it() {
        // containerd's default profile shape: errno by default, a long
        // allow list on three ABIs, an argument rule.
        let names: Vec<String> = (0..460)
            .filter_map(|n| syscalls::x86_64::Sysno::new(n).map(|s| format!("{:?}", s.name())))
            .filter(|n| n != "\"getppid\"" && n != "\"personality\"")
            .collect();
        let f = Filter::compile(&profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}},
                  {{"names":["personality"],"action":"SCMP_ACT_ALLOW",
                    "args":[{{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}}]}}]}}"#,
            names.join(",")
        )))
        .unwrap();
        // SAFETY: the child only makes raw system calls and _exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: as above.
                unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    let ok = f.install().is_ok();
                    let ppid = libc::syscall(libc::SYS_getppid);
                    let errno = *libc::__errno_location();
                    let query = libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
                    let denied = libc::syscall(libc::SYS_personality, 0u64);
                    let code = if !ok {
                        1
                    } else if ppid != -1 || errno != 38 {
                        2
                    } else if query < 0 || denied != -1 {
                        3
                    } else {
                        0
                    };
                    libc::_exit(code)
                }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                assert_eq!(libc::WEXITSTATUS(status), 0);
            }
        }
    }

    #[test]
    fn everything_the_shim_announces_compiles() {
        use podvisor_protocol::guest_features as g;
        for a in g::SECCOMP_ACTIONS {
            let json = format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getpid"],"action":"{a}"}}]}}"#
            );
            Filter::compile(&profile(&json)).unwrap();
        }
        for op in g::SECCOMP_OPERATORS {
            let json = format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getpid"],"action":"SCMP_ACT_ERRNO","args":[{{"index":0,"value":1,"valueTwo":1,"op":"{op}"}}]}}]}}"#
            );
            Filter::compile(&profile(&json)).unwrap();
        }
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","architectures":{:?},"flags":{:?}}}"#,
            g::SECCOMP_ARCHES,
            g::SECCOMP_FLAGS
        );
        Filter::compile(&profile(&json)).unwrap();
    }

    #[test]
    fn what_cannot_be_done_is_named() {
        let cases = [
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["no_such_call"],"action":"SCMP_ACT_ERRNO"}]}"#,
                "no Linux architecture has it",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
                "SCMP_ACT_NOTIFY",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
                "/run/agent.sock",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
                "argument index 6",
            ),
        ];
        for (json, want) in cases {
            let e = Filter::compile(&profile(json)).unwrap_err();
            assert!(e.to_string().contains(want), "{json}: {e}");
        }
        // An unknown action is a parse error that names it.
        let e = serde_json::from_str::<LinuxSeccomp>(r#"{"defaultAction":"SCMP_ACT_BOGUS"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_BOGUS"), "{e}");
    }
}
