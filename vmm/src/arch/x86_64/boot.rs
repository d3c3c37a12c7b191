//! Loading the guest: the kernel (a vmlinux ELF, entered at its 64-bit
//! entry point, or a bzImage, entered at its 64-bit entry 0x200 past the
//! load address), the initramfs at the top of low RAM, the command line,
//! and the zero page with the E820 map and the RSDP address.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    low32, CMDLINE, CMDLINE_MAX, EBDA, HIMEM, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE,
};
use crate::memory::{ram_ranges, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither a vmlinux ELF nor a bzImage ({elf}; {bzimage})")]
    KernelFormat {
        path: String,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("reading initramfs {path}: {source}")]
    Initramfs {
        path: String,
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit in guest RAM between the kernel (ends at {kernel_end:#x}) and {top:#x}; give the VM more memory")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing the {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rip: u64,
}

/// The loaded kernel: entry point, where it ends, its setup header (bzImage).
struct Kernel {
    entry: u64,
    end: u64,
    header: Option<setup_header>,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Kernel, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::OpenKernel {
        path: p.clone(),
        source,
    })?;
    let elf = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM))) {
        Ok(r) => {
            return Ok(Kernel {
                entry: r.kernel_load.raw_value(),
                end: r.kernel_end,
                header: None,
            })
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM))) {
        Ok(r) => {
            let header = r.setup_header;
            // The decompressor needs init_size bytes from the load address.
            let init_end = header.map_or(0, |h| r.kernel_load.raw_value() + u64::from(h.init_size));
            Ok(Kernel {
                entry: r.kernel_load.raw_value() + 0x200,
                end: r.kernel_end.max(init_end),
                header,
            })
        }
        Err(bzimage) => Err(BootError::KernelFormat {
            path: p,
            elf,
            bzimage,
        }),
    }
}

/// Places the initramfs as high in low RAM as the kernel allows; returns
/// (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BootError::Initramfs { path: p, source })?;
    let size = data.len() as u64;
    let low_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let top = low_end.min(addr_max.saturating_add(1));
    let kernel_end = kernel_end.next_multiple_of(PAGE);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(BootError::InitramfsTooLarge {
                size,
                kernel_end,
                top,
            })
        }
    };
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| BootError::Memory {
            what: "initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// The E820 map for a guest of `mem_size` bytes.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let ram = |addr, size| boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA)];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.raw_value();
        if start == 0 {
            map.push(ram(HIMEM, len - HIMEM));
        } else {
            debug_assert_eq!(start, MMIO_GAP_END);
            map.push(ram(start, len));
        }
    }
    map
}

/// Everything a boot needs besides the vCPU registers.
#[derive(Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub rsdp: u64,
}

/// Loads kernel, initramfs and command line and writes the zero page.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Entry, BootError> {
    let kernel = load_kernel(mem, spec.kernel)?;
    let mut params = boot_params::default();
    match kernel.header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let max_cmdline = match params.hdr.cmdline_size {
        0 => CMDLINE_MAX,
        n => (n as usize + 1).min(CMDLINE_MAX),
    };
    let mut cmdline = Cmdline::new(max_cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(spec.cmdline).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} ({} bytes, at most {})",
            spec.cmdline.len(),
            max_cmdline - 1
        ))
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = const { low32(CMDLINE) };
    // Below CMDLINE_MAX, which the Cmdline above enforced.
    params.hdr.cmdline_size = u32::try_from(spec.cmdline.len()).unwrap_or(u32::MAX);

    if let Some(path) = spec.initramfs {
        let addr_max = match params.hdr.initrd_addr_max {
            0 => MMIO_GAP_START - 1,
            n => u64::from(n),
        };
        let (addr, size) = load_initramfs(mem, path, kernel.end, addr_max)?;
        // load_initramfs places it below addr_max, itself below 4 GiB.
        let too_large = || BootError::InitramfsTooLarge {
            size,
            kernel_end: kernel.end,
            top: addr_max,
        };
        params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| too_large())?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| too_large())?;
    }

    let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    let map = e820_map(mem_size);
    params.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.acpi_rsdp_addr = spec.rsdp;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|source| BootError::Memory {
            what: "zero page",
            source,
        })?;
    Ok(Entry { rip: kernel.entry })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal vmlinux: one PT_LOAD of `code` at 1 MiB, entered there.
    pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&HIMEM.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
        e[ph + 16..ph + 24].copy_from_slice(&HIMEM.to_le_bytes()); // vaddr
        e[ph + 24..ph + 32].copy_from_slice(&HIMEM.to_le_bytes()); // paddr
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn elf_kernel_zero_page_and_e820() {
        let mem = crate::memory::create(64).unwrap();
        let k = file(&tiny_elf(&[0xf4]));
        let initrd = file(&[7u8; 5000]);
        let entry = load(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initramfs: Some(initrd.path()),
                cmdline: "console=ttyS0 hello",
                rsdp: 0xe0000,
            },
        )
        .unwrap();
        assert_eq!(entry.rip, HIMEM);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIMEM)).unwrap(), 0xf4);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE);
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 hello\0");
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let (ri, rs) = ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size });
        assert_eq!(rs, 5000);
        assert_eq!(u64::from(ri) % PAGE, 0);
        assert!(u64::from(ri) + 5000 <= 64 << 20);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(ri) + 4999))
                .unwrap(),
            7
        );
        assert_eq!(p.e820_entries, 2);
        let e = p.e820_table;
        assert_eq!(({ e[0].addr }, { e[0].size }), (0, EBDA));
        assert_eq!(({ e[1].addr }, { e[1].size }), (HIMEM, (64 << 20) - HIMEM));
    }

    #[test]
    fn corrupt_kernel_is_refused_with_both_reasons() {
        let mem = crate::memory::create(16).unwrap();
        let k = file(b"this is not a kernel at all, not even close........");
        let err = load(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initramfs: None,
                cmdline: "",
                rsdp: 0,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("neither a vmlinux ELF nor a bzImage"),
            "{err}"
        );
    }

    #[test]
    fn missing_kernel_and_oversized_initramfs_are_clear_errors() {
        let mem = crate::memory::create(16).unwrap();
        let err = load(
            &mem,
            &BootSpec {
                kernel: Path::new("/nonexistent/vmlinux"),
                initramfs: None,
                cmdline: "",
                rsdp: 0,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");

        let k = file(&tiny_elf(&[0xf4]));
        let big = file(&vec![0u8; 17 << 20]);
        let err = load(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initramfs: Some(big.path()),
                cmdline: "",
                rsdp: 0,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = crate::memory::create(16).unwrap();
        let k = file(&tiny_elf(&[0xf4]));
        let long = "x".repeat(CMDLINE_MAX + 10);
        let err = load(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initramfs: None,
                cmdline: &long,
                rsdp: 0,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::Cmdline(_)), "{err}");
    }

    #[test]
    fn large_guest_map_resumes_above_4g() {
        let m = e820_map(5 << 30);
        assert_eq!(m.len(), 3);
        assert_eq!(
            ({ m[2].addr }, { m[2].size }),
            (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START)
        );
    }
}
