//! What the async test binaries share: their tests as libtest trials run
//! one after another on one tokio runtime, each reported as ignored where
//! the binary found it cannot run (the binary prints why).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Failed, Trial};

/// An async test: `|| Box::pin(a_test())`.
pub type AsyncTest = fn() -> Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

/// `(name, test, ignored)` as trials on one multi-threaded runtime.
pub fn async_trials(tests: Vec<(&'static str, AsyncTest, bool)>) -> std::io::Result<Vec<Trial>> {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    Ok(tests
        .into_iter()
        .map(|(name, test, ignored)| {
            let rt = rt.clone();
            Trial::test(name, move || {
                rt.block_on(test())
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
            .with_ignored_flag(ignored)
        })
        .collect())
}

/// Why `/dev/kvm` cannot be used here, if it cannot.
pub fn kvm_unusable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm: {e}"))
}
