//! Architecture support. x86_64 only for now; another architecture would
//! be a sibling module with the same items.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
