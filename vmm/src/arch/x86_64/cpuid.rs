//! What a vCPU sees of the CPU: KVM's supported CPUID, with a coherent
//! topology (one socket, `n` cores, one thread each, APIC id = vCPU index),
//! the hypervisor bit set and the PMU hidden; then the VM config's CPUID
//! filter clears what it names.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use podvisor_vmm_config::{CpuidBits, CpuidRegister};

/// Whether the CPU is AMD's (leaf 0's vendor string "AuthenticAMD").
pub fn is_amd(supported: &CpuId) -> bool {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// The CPUID for vCPU `index` of `count`, from KVM's supported set.
/// `hide` clears bits on top.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8, hide: &[CpuidBits]) -> CpuId {
    let mut cpuid = supported.clone();
    let n = u32::from(count.max(1));
    // Bits needed to number the cores.
    let core_bits = 32 - (n - 1).leading_zeros();
    let apic_id = u32::from(index);
    for e in cpuid.as_mut_slice() {
        patch(e, apic_id, n, core_bits);
        for h in hide {
            clear(e, h);
        }
    }
    cpuid
}

/// Clears `h.bits` in `e` when `e` is the leaf (and subleaf) `h` names.
fn clear(e: &mut kvm_cpuid_entry2, h: &CpuidBits) {
    let indexed = e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
    if e.function != h.leaf || (indexed && e.index != h.subleaf) {
        return;
    }
    let reg = match h.register {
        CpuidRegister::Eax => &mut e.eax,
        CpuidRegister::Ebx => &mut e.ebx,
        CpuidRegister::Ecx => &mut e.ecx,
        CpuidRegister::Edx => &mut e.edx,
    };
    *reg &= !h.bits;
}

fn patch(e: &mut kvm_cpuid_entry2, apic_id: u32, n: u32, core_bits: u32) {
    match e.function {
        1 => {
            // EBX: initial APIC id, logical processors per package, CLFLUSH size.
            e.ebx = (apic_id << 24) | (n << 16) | (e.ebx & 0xffff);
            if n > 1 {
                e.edx |= 1 << 28; // HTT: more than one logical processor
            } else {
                e.edx &= !(1 << 28);
            }
            e.ecx |= 1 << 31; // running under a hypervisor
        }
        4 => {
            // Deterministic cache parameters: cores per package; L1/L2 per
            // core, the last level shared by all.
            let level = (e.eax >> 5) & 7;
            let sharing = if level >= 3 { n - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
        }
        0xa => {
            // No virtual PMU.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: SMT level (1 thread), then core level.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = n;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x8000_0008 => {
            // AMD: cores per package - 1, and the APIC id width.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n - 1);
        }
        0x8000_001e => {
            // AMD: extended APIC id, one thread per core.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            kvm_cpuid_entry2 {
                eax: 3 << 5,
                ..entry(4, 3)
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            kvm_cpuid_entry2 {
                eax: 0x0714_0004,
                ..entry(0xa, 0)
            },
        ])
        .unwrap()
    }

    #[test]
    fn topology_is_coherent_per_vcpu() {
        let c = for_vcpu(&sample(), 2, 4, &[]);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical count");
        assert_ne!(e[0].edx & (1 << 28), 0, "HTT with 4 CPUs");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(e[1].eax >> 26, 3, "cores per package - 1");
        assert_eq!((e[1].eax >> 14) & 0xfff, 3, "L3 shared by all");
        assert_eq!((e[2].ebx, e[2].ecx >> 8, e[2].edx), (1, 1, 2), "SMT level");
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx >> 8), (2, 4, 2), "core level");
        assert_eq!(e[4].ecx >> 8, 0, "no level beyond core");
        assert_eq!(e[5].eax, 0, "PMU hidden");
    }

    #[test]
    fn the_filter_clears_only_what_it_names() {
        let mut s = sample();
        for e in s.as_mut_slice() {
            e.ebx = u32::MAX;
        }
        // Leaf 0xb is indexed: subleaf 1 only. Leaf 1 is not: any index.
        s.as_mut_slice()[2..5]
            .iter_mut()
            .for_each(|e| e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        let hide = [
            CpuidBits {
                leaf: 0xb,
                subleaf: 1,
                register: CpuidRegister::Edx,
                bits: 0b10,
            },
            CpuidBits {
                leaf: 1,
                subleaf: 7,
                register: CpuidRegister::Ebx,
                bits: 0xff,
            },
        ];
        let plain = for_vcpu(&s, 3, 4, &[]);
        let c = for_vcpu(&s, 3, 4, &hide);
        let (p, e) = (plain.as_slice(), c.as_slice());
        assert_eq!(p[2].edx, 3, "APIC id 3 in the SMT level");
        assert_eq!(e[2].edx, 3, "subleaf 0 untouched");
        assert_eq!(e[3].edx, 1, "subleaf 1: bit 1 of APIC id 3 cleared");
        assert_eq!(p[0].ebx & 0xff, 0xff);
        assert_eq!(e[0].ebx, p[0].ebx & !0xff, "unindexed leaf 1 cleared");
        assert_eq!(e[1].ebx, p[1].ebx, "other leaves untouched");
    }

    #[test]
    fn amd_is_told_by_its_vendor_string() {
        let vendor = |ebx, edx, ecx| {
            CpuId::from_entries(&[kvm_cpuid_entry2 {
                ebx,
                edx,
                ecx,
                ..entry(0, 0)
            }])
            .unwrap()
        };
        // "AuthenticAMD" and "GenuineIntel" as CPUID leaf 0 spells them.
        assert!(is_amd(&vendor(0x6874_7541, 0x6974_6e65, 0x444d_4163)));
        assert!(!is_amd(&vendor(0x756e_6547, 0x4965_6e69, 0x6c65_746e)));
        assert!(!is_amd(&sample()));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = for_vcpu(&sample(), 0, 1, &[]);
        let e = c.as_slice();
        assert_eq!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[3].eax, 0);
    }
}
