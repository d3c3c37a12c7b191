//! The images critest pulls, made here: the upstream ones
//! (`registry.k8s.io/e2e-test-images/*`, `gcr.io/k8s-staging-cri-tools/*`)
//! cannot be reached from these machines, so each gets a stand-in built
//! from Debian's busybox-static with what the suite looks at: the users
//! and groups of the cri-tools Dockerfiles (`images/` of that module), a
//! web server on the same port for nginx and httpd, the marker files that
//! tell the tag images apart, a setuid program for no_new_privs. Only the
//! digest-pinned image cannot be matched (its digest is of upstream's
//! bytes).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::ImageDef;

const E2E: &str = "registry.k8s.io/e2e-test-images";
const STAGING: &str = "gcr.io/k8s-staging-cri-tools";

/// The registries the stand-ins are served for.
pub const REGISTRIES: [&str; 3] = ["registry.k8s.io", "k8s.gcr.io", "gcr.io"];

/// The upstream busybox image's users and groups (the suite runs as
/// `nobody` and `www-data`).
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
";
const GROUP: &str = "root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:8:
www-data:x:33:
operator:x:37:
users:x:100:
nogroup:x:65534:
";

/// `ipcs -m` for busybox builds without it: the System V shared memory
/// segments of the caller's IPC namespace.
const IPCS: &str = "#!/bin/sh\n# ipcs stand-in: the shared memory segments this IPC namespace has\ncat /proc/sysvipc/shm\n";

/// `pgrep NAME` for busybox builds without it: the pids whose process name
/// contains NAME; status 1 when there are none.
const PGREP: &str = r#"#!/bin/sh
# pgrep stand-in: pids whose process name contains $1
found=1
for d in /proc/[0-9]*; do
  read -r comm < "$d/comm" 2>/dev/null || continue
  case "$comm" in *"$1"*) echo "${d#/proc/}"; found=0 ;; esac
done
exit $found
"#;

/// The e2e nonewprivs program (nonewprivs.S), assembled with binutils.
fn nonewprivs() -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("nonewprivs.S");
    std::fs::write(&src, include_str!("nonewprivs.S"))?;
    let obj = dir.path().join("nonewprivs.o");
    let bin = dir.path().join("nonewprivs");
    for (tool, args) in [
        ("as", vec!["--64".into(), "-o".into(), obj.clone(), src]),
        (
            "ld",
            vec![
                "-static".into(),
                "-nostdlib".into(),
                "-e".into(),
                "_start".into(),
                "-o".into(),
                bin.clone(),
                obj,
            ],
        ),
    ] {
        let st = Command::new(tool)
            .args(&args)
            .status()
            .with_context(|| format!("running {tool} (apt-get install binutils)"))?;
        if !st.success() {
            bail!("{tool} failed on nonewprivs.S");
        }
    }
    Ok(std::fs::read(bin)?)
}

/// An image and every reference it is pushed as.
#[derive(Debug)]
pub struct StandIn {
    pub refs: Vec<String>,
    pub def: ImageDef,
}

fn busybox(cmd: &[&str]) -> ImageDef {
    ImageDef::with_cmd(cmd)
        .file("/etc/passwd", PASSWD, 0o644)
        .file("/etc/group", GROUP, 0o644)
        .file("/bin/ipcs", IPCS, 0o755)
        .file("/bin/pgrep", PGREP, 0o755)
}

/// A web server on `port` standing in for nginx: busybox httpd run from a
/// copy named nginx (so `pidof nginx` finds it), its pid in
/// /var/run/nginx.pid, under a shell whose command line reads "nginx:
/// master process" as nginx's PID 1 does, that stops on SIGTERM.
fn nginx(port: u16) -> ImageDef {
    let script = format!(
        ": nginx: master process, a busybox httpd stand-in; \
         trap 'kill $pid; wait $pid; exit 0' TERM INT QUIT; \
         (exec -a busybox /usr/sbin/nginx httpd -f -p {port} -h /usr/share/nginx/html) & pid=$!; \
         mkdir -p /var/run; echo $pid > /var/run/nginx.pid; wait $pid"
    );
    let mut def = busybox(&["/bin/sh", "-c", &script]).file(
        "/usr/share/nginx/html/index.html",
        "<title>Welcome to nginx!</title>\n",
        0o644,
    );
    def.links
        .push(("/usr/sbin/nginx".into(), "/bin/busybox".into()));
    def.ports.push(port);
    def
}

/// Every image critest pulls, from the cri-tools release's sources.
pub fn stand_ins() -> Result<Vec<StandIn>> {
    let one = |r: String, def: ImageDef| StandIn { refs: vec![r], def };
    let marked = |marker: &str| busybox(&["sh"]).file(&format!("/{marker}"), "", 0o644);
    let user = |u: &str| {
        let mut d = busybox(&["sh"]);
        d.user = Some(u.to_string());
        d
    };
    let httpd = busybox(&[
        "/bin/sh",
        "-c",
        "echo 'httpd: a busybox httpd stand-in serving port 80' >&2; \
         trap 'kill $pid; wait $pid; exit 0' TERM INT QUIT; \
         httpd -f -p 80 -h /usr/local/apache2/htdocs & pid=$!; wait $pid",
    ])
    .file(
        "/usr/local/apache2/htdocs/index.html",
        "<html><body><h1>It works!</h1></body></html>\n",
        0o644,
    );
    let pause = busybox(&[
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
    ]);
    let mut predefined = busybox(&["sh"])
        .file(
            "/etc/passwd",
            format!("{PASSWD}default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"),
            0o644,
        )
        .file(
            "/etc/group",
            format!("{GROUP}default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
            0o644,
        );
    predefined.user = Some("1000".into());
    let mut all = vec![
        one(format!("{E2E}/busybox:1.29-2"), busybox(&["sh"])),
        one(format!("{E2E}/nginx:1.14-2"), nginx(80)),
        one(format!("{E2E}/httpd:2.4.39-4"), httpd),
        one(
            format!("{STAGING}/hostnet-nginx-amd64:latest"),
            nginx(12003),
        ),
        StandIn {
            refs: vec![
                "registry.k8s.io/pause:3.9".into(),
                "k8s.gcr.io/pause:3.9".into(),
            ],
            def: pause,
        },
        one(
            format!("{STAGING}/test-image-user-uid:latest"),
            user("1002"),
        ),
        one(
            format!("{STAGING}/test-image-user-username:latest"),
            user("www-data"),
        ),
        one(
            format!("{STAGING}/test-image-user-uid-group:latest"),
            user("1003:1004"),
        ),
        one(
            format!("{STAGING}/test-image-user-username-group:latest"),
            user("www-data:1004"),
        ),
        one(
            format!("{STAGING}/test-image-predefined-group:latest"),
            predefined,
        ),
        one(
            format!("{E2E}/nonewprivs:1.3"),
            busybox(&["/usr/local/bin/nnp"]).file("/usr/local/bin/nnp", nonewprivs()?, 0o4755),
        ),
        StandIn {
            refs: (1..=3)
                .map(|t| format!("{STAGING}/test-image-tags:{t}"))
                .collect(),
            def: marked("same-image"),
        },
    ];
    for name in [
        "test-image-1",
        "test-image-2",
        "test-image-3",
        "test-image-latest",
    ] {
        all.push(one(format!("{STAGING}/{name}:latest"), marked(name)));
    }
    for tag in ["test", "all"] {
        all.push(one(format!("{STAGING}/test-image-tag:{tag}"), marked(tag)));
    }
    Ok(all)
}

/// `registry/repo/path:tag` split into the registry host and the
/// repository and tag as pushed to the mirror.
pub fn split_ref(r: &str) -> Option<(&str, &str, &str)> {
    let (host, rest) = r.split_once('/')?;
    let (repo, tag) = rest.rsplit_once(':')?;
    Some((host, repo, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_splits_onto_a_served_registry() {
        for s in stand_ins().unwrap() {
            for r in &s.refs {
                let (host, repo, tag) = split_ref(r).unwrap();
                assert!(REGISTRIES.contains(&host), "{r}");
                assert!(!repo.is_empty() && !tag.is_empty(), "{r}");
            }
        }
    }
}
