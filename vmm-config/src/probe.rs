//! The verdict of the KVM probe (`podvisor-vmm --probe`, which prints it
//! as one JSON line): whether `/dev/kvm` runs guest code at hardware speed.

use serde::{Deserialize, Serialize};

/// Below this many guest instructions per second, KVM counts as slow.
/// Hardware does thousands of MIPS; emulation under a few.
pub const FAST_MIPS: f64 = 200.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Verdict {
    /// Guest code runs at hardware speed.
    Fast { mips: f64 },
    /// KVM works but emulates: fine for tiny guests, not for Linux.
    Slow { mips: f64 },
    /// No usable KVM, and why.
    Unavailable(String),
}

impl Verdict {
    /// The verdict for a guest that ran at `mips`.
    pub fn from_mips(mips: f64) -> Verdict {
        if mips >= FAST_MIPS {
            Verdict::Fast { mips }
        } else {
            Verdict::Slow { mips }
        }
    }

    pub fn is_fast(&self) -> bool {
        matches!(self, Verdict::Fast { .. })
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Fast { mips } => {
                write!(f, "KVM runs guest code at hardware speed ({mips:.0} MIPS)")
            }
            Verdict::Slow { mips } => write!(
                f,
                "KVM emulates guest code ({mips:.1} MIPS, below {FAST_MIPS} MIPS): too slow to boot Linux"
            ),
            Verdict::Unavailable(why) => write!(f, "KVM unavailable: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_round_trip_as_json() {
        for v in [
            Verdict::from_mips(5000.0),
            Verdict::from_mips(1.5),
            Verdict::Unavailable("opening /dev/kvm: No such file".into()),
        ] {
            let line = serde_json::to_string(&v).unwrap();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(serde_json::from_str::<Verdict>(&line).unwrap(), v);
        }
        assert!(Verdict::from_mips(FAST_MIPS).is_fast());
        assert!(!Verdict::from_mips(FAST_MIPS - 1.0).is_fast());
    }
}
