//! A private image registry on loopback (Debian's `docker-registry`, the
//! CNCF distribution server), and pushing images built here to it, so a
//! containerd pulls them as it would from a real registry.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{sha256, Built, MANIFEST};

#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on `addr` with its storage in a temporary
    /// directory.
    pub fn start(addr: &str) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-registry-")
            .tempdir()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let bin = crate::vm::tool("DOCKER_REGISTRY", "docker-registry");
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (apt-get install docker-registry)",
                    bin.display()
                )
            })?;
        let reg = Registry {
            child,
            addr: addr.to_string(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while reg.request("GET", "/v2/", &[], &[]).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(reg._dir.path().join("registry.log"))
                    .unwrap_or_default();
                bail!("the registry on {addr} did not come up:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(reg)
    }

    /// Pushes `image` as `repo:tag` (a repository path such as
    /// `e2e-test-images/busybox`).
    pub fn push(&self, repo: &str, tag: &str, image: &Built) -> Result<()> {
        for blob in [&image.layer, &image.config] {
            let digest = sha256(blob);
            let head = self.request("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], &[])?;
            if head.status == 200 {
                continue;
            }
            let start = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])?;
            if start.status != 202 {
                bail!("starting an upload to {repo}: HTTP {}", start.status);
            }
            let location = start
                .header("location")
                .context("upload without a Location")?;
            let path = location
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
                .unwrap_or_else(|| location.to_string());
            let sep = if path.contains('?') { '&' } else { '?' };
            let done = self.request(
                "PUT",
                &format!("{path}{sep}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                blob,
            )?;
            if done.status != 201 {
                bail!("uploading {digest} to {repo}: HTTP {}", done.status);
            }
        }
        let put = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", MANIFEST)],
            &image.manifest,
        )?;
        if put.status != 201 {
            bail!(
                "pushing {repo}:{tag}: HTTP {} {}",
                put.status,
                String::from_utf8_lossy(&put.body)
            );
        }
        Ok(())
    }

    /// One HTTP/1.1 request on a connection of its own.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        Response::parse(&raw)
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Result<Response> {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of HTTP headers")?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .context("bad HTTP status line")?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Response {
            status,
            headers,
            body: raw[end + 4..].to_vec(),
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
