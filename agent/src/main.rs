//! The `podvisor-agent` binary: PID 1 of a podvisor guest. Everything it
//! does is the library's (`lib.rs`).

fn main() {
    podvisor_agent::main()
}
