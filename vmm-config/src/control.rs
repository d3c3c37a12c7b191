//! The client side of `podvisor-vmm`'s control socket (the ops are
//! listed where the VMM serves them, `podvisor_vmm::control`): one JSON
//! request per connection, one JSON answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long an answer may take (a snapshot writes all of guest memory).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Sends `{"op": op}` and returns the answer.
pub fn request(path: &Path, op: &str) -> std::io::Result<serde_json::Value> {
    send(path, &serde_json::json!({ "op": op }))
}

/// Sends one request and returns the answer.
pub fn send(path: &Path, req: &serde_json::Value) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(ANSWER_WITHIN))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
