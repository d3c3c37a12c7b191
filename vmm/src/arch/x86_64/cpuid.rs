//! What a vCPU sees of the CPU: KVM's supported CPUID, with a coherent
//! topology (one socket, `n` cores, one thread each, APIC id = vCPU index),
//! the hypervisor bit set and the PMU hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// The CPUID for vCPU `index` of `count`, from KVM's supported set.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let n = u32::from(count.max(1));
    // Bits needed to number the cores.
    let core_bits = 32 - (n - 1).leading_zeros();
    let apic_id = u32::from(index);
    for e in cpuid.as_mut_slice() {
        patch(e, apic_id, n, core_bits);
    }
    cpuid
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
        let c = for_vcpu(&sample(), 2, 4);
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
    fn single_vcpu_has_no_htt() {
        let c = for_vcpu(&sample(), 0, 1);
        let e = c.as_slice();
        assert_eq!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[3].eax, 0);
    }
}
