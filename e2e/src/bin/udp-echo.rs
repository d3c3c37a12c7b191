//! `podvisor-udp-echo`: a UDP echo server and client for the e2e suite's
//! test image, whose busybox `nc` has no UDP. Built static (musl) and added
//! to the image as `/bin/udp-echo`.
//!
//! - `udp-echo serve PORT`: answers every datagram with its own bytes.
//! - `udp-echo ask HOST:PORT MESSAGE`: sends MESSAGE (again each second, as
//!   UDP may lose one) and prints the first answer; fails after 10 s.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port] => serve(port),
        ["ask", to, message] => ask(to, message),
        _ => bail!("usage: udp-echo serve PORT | udp-echo ask HOST:PORT MESSAGE"),
    }
}

fn serve(port: &str) -> Result<()> {
    let socket = UdpSocket::bind(format!("0.0.0.0:{port}")).context("binding")?;
    let mut buf = [0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).context("receiving")?;
        if let Err(e) = socket.send_to(&buf[..n], from) {
            eprintln!("udp-echo: answering {from}: {e}");
        }
    }
}

fn ask(to: &str, message: &str) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        socket
            .send_to(message.as_bytes(), to)
            .with_context(|| format!("sending to {to}"))?;
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                println!("{}", String::from_utf8_lossy(&buf[..n]));
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    bail!("no answer from {to} within 10 s")
}
