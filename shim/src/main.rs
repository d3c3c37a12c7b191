//! containerd-shim-podvisor-v2: see the `podvisor_shim` library.

use std::time::Duration;

fn main() {
    // Answered before the shim crate's bootstrap, which needs the
    // environment of a real start.
    if std::env::args()
        .skip(1)
        .any(|a| a == "-info" || a == "--info")
    {
        let mut options = Vec::new();
        let answer = std::io::Read::read_to_end(&mut std::io::stdin(), &mut options)
            .map_err(|e| format!("reading runtime options from stdin: {e}"))
            .and_then(|_| podvisor_shim::info::runtime_info(&options))
            .and_then(|out| {
                std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(|e| e.to_string())
            });
        if let Err(e) = answer {
            eprintln!("{}: -info: {e}", podvisor_names::RUNTIME_TYPE);
            std::process::exit(1);
        }
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pool = podvisor_names::pool::SUBCOMMAND;
    if let Some(command) = args
        .first()
        .map(String::as_str)
        .filter(|c| *c == "template" || *c == pool)
    {
        // What the hypervisor layer and the pool log goes to stderr.
        if log::set_logger(&StderrLog).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        let done = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| {
                rt.block_on(async {
                    if command == "template" {
                        podvisor_shim::warm::cli(&args[1..]).await
                    } else {
                        podvisor_shim::pool::cli(&args[1..]).await
                    }
                })
            });
        if let Err(e) = done {
            eprintln!("{}: {command}: {e}", podvisor_names::RUNTIME_TYPE);
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: tokio runtime: {e}", podvisor_names::RUNTIME_TYPE);
            std::process::exit(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<podvisor_shim::Shim>(
        podvisor_names::RUNTIME_TYPE,
        Some(podvisor_shim::shim_config()),
    ));
    // A FIFO open nobody answers must not keep the shim alive.
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// The subcommands' logger: tracing's events (through its `log` feature)
/// as lines on stderr, with the time.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            eprintln!(
                "{}.{:03} {} {}",
                t.as_secs(),
                t.subsec_millis(),
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}
