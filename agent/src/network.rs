//! The pod's network inside the guest: each NIC the host gave the VM
//! (found by its MAC) is renamed, given its MTU and addresses and brought
//! up; then routes and static neighbours are added. Plain ioctls on a
//! datagram socket: the kernel's classic interface covers all of it, and
//! the agent stays small.
//!
//! Validation happens first, for the whole request: a bad address or an
//! unknown MAC changes nothing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use podvisor_protocol::api;

use crate::error::{internal, invalid, not_found, Result};

/// A request checked and parsed.
#[derive(Debug, PartialEq)]
pub(crate) struct Plan {
    interfaces: Vec<Nic>,
    routes: Vec<Route>,
    neighbors: Vec<Neighbor>,
}

#[derive(Debug, PartialEq)]
struct Nic {
    mac: [u8; 6],
    name: String,
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, PartialEq)]
struct Route {
    /// None: the default route.
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    device: String,
}

#[derive(Debug, PartialEq)]
struct Neighbor {
    address: Ipv4Addr,
    mac: [u8; 6],
    device: String,
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(invalid!("MAC {s:?} is not six hex octets"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| invalid!("MAC {s:?} is not six hex octets"))?;
    }
    Ok(mac)
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| invalid!("{what} {s:?} is not an IP address"))
}

fn check_prefix(ip: IpAddr, prefix: u32, what: &str) -> Result<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid!("{what} {ip}/{prefix}: prefix beyond {max}"));
    }
    u8::try_from(prefix).map_err(|_| invalid!("{what} {ip}/{prefix}: prefix beyond {max}"))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name.contains(['/', ' ', ':'])
        || name == "."
        || name == ".."
    {
        return Err(invalid!("interface name {name:?} is not valid"));
    }
    Ok(())
}

pub(crate) fn plan(req: &api::ConfigureNetworkRequest) -> Result<Plan> {
    let mut interfaces = Vec::new();
    for i in &req.interfaces {
        check_name(&i.name)?;
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid!("MTU {} of {} is out of range", i.mtu, i.name));
        }
        let mut addresses = Vec::new();
        for a in &i.addresses {
            let ip = parse_ip(&a.address, "address")?;
            addresses.push((ip, check_prefix(ip, a.prefix, "address")?));
        }
        interfaces.push(Nic {
            mac: parse_mac(&i.mac)?,
            name: i.name.clone(),
            mtu: i.mtu,
            addresses,
        });
    }
    let known = |dev: &str| interfaces.iter().any(|n| n.name == dev) || dev == "lo";
    let mut routes = Vec::new();
    for r in &req.routes {
        if !known(&r.device) {
            return Err(invalid!(
                "route to {:?} names unknown device {:?}",
                r.destination,
                r.device
            ));
        }
        let destination = match r.destination.as_str() {
            "" => None,
            d => {
                let (ip, prefix) = d
                    .split_once('/')
                    .ok_or_else(|| invalid!("route destination {d:?} is not a CIDR"))?;
                let ip = parse_ip(ip, "route destination")?;
                let prefix: u32 = prefix
                    .parse()
                    .map_err(|_| invalid!("route destination {d:?} is not a CIDR"))?;
                Some((ip, check_prefix(ip, prefix, "route destination")?))
            }
        };
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(parse_ip(g, "gateway")?),
        };
        if let (Some((d, _)), Some(g)) = (destination, gateway) {
            if d.is_ipv4() != g.is_ipv4() {
                return Err(invalid!("route to {d} via {g} mixes address families"));
            }
        }
        if destination.is_none() && gateway.is_none() {
            return Err(invalid!("a default route needs a gateway"));
        }
        routes.push(Route {
            destination,
            gateway,
            device: r.device.clone(),
        });
    }
    let mut neighbors = Vec::new();
    for n in &req.neighbors {
        if !known(&n.device) {
            return Err(invalid!(
                "neighbour {} names unknown device {:?}",
                n.address,
                n.device
            ));
        }
        let IpAddr::V4(address) = parse_ip(&n.address, "neighbour")? else {
            return Err(invalid!(
                "neighbour {}: only IPv4 neighbours are supported",
                n.address
            ));
        };
        neighbors.push(Neighbor {
            address,
            mac: parse_mac(&n.mac)?,
            device: n.device.clone(),
        });
    }
    Ok(Plan {
        interfaces,
        routes,
        neighbors,
    })
}

/// The guest's NICs by MAC, from sysfs.
fn nics_by_mac() -> Result<HashMap<[u8; 6], String>> {
    let mut out = HashMap::new();
    let dir = std::fs::read_dir("/sys/class/net").map_err(|e| internal!("/sys/class/net: {e}"))?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(addr) = std::fs::read_to_string(e.path().join("address")) {
            if let Ok(mac) = parse_mac(addr.trim()) {
                out.insert(mac, name);
            }
        }
    }
    Ok(out)
}

fn socket(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(internal!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// IFF_UP as `ifreq` holds interface flags (a compile error if it could
/// not).
pub(crate) const IFF_UP: libc::c_short = {
    assert!(libc::IFF_UP >= 0 && libc::IFF_UP <= libc::c_short::MAX as libc::c_int);
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let up = libc::IFF_UP as libc::c_short;
    up
};

/// AF_INET as a socket address holds it.
const AF_INET: libc::sa_family_t = {
    assert!(libc::AF_INET >= 0 && libc::AF_INET <= libc::sa_family_t::MAX as libc::c_int);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked just above
    let family = libc::AF_INET as libc::sa_family_t;
    family
};

/// A byte of a name or address as the kernel's `char` arrays hold it.
pub(crate) fn c_char(b: u8) -> libc::c_char {
    libc::c_char::from_ne_bytes([b])
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = c_char(s);
    }
    r
}

/// ioctl(fd, req, arg), with the errno named after `what`.
fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: every caller passes the struct its request reads and writes.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) } < 0 {
        return Err(internal!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: AF_INET,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn ifindex(name: &str) -> Result<libc::c_int> {
    let c = std::ffi::CString::new(name).map_err(|_| invalid!("interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(not_found!("no interface {name:?} in the guest")),
        i => libc::c_int::try_from(i).map_err(|_| internal!("interface {name:?} has index {i}")),
    }
}

fn set_flags(s: &OwnedFd, name: &str, up: bool) -> Result<()> {
    let mut r = ifreq(name);
    ioctl(
        s,
        libc::SIOCGIFFLAGS as _,
        &mut r,
        &format!("flags of {name}"),
    )?;
    // SAFETY: the union member SIOCGIFFLAGS filled.
    let mut flags = unsafe { r.ifr_ifru.ifru_flags };
    if up {
        flags |= IFF_UP;
    } else {
        flags &= !IFF_UP;
    }
    r.ifr_ifru.ifru_flags = flags;
    ioctl(
        s,
        libc::SIOCSIFFLAGS as _,
        &mut r,
        &format!("bringing {name} {}", if up { "up" } else { "down" }),
    )
}

/// in6_rtmsg from <linux/ipv6_route.h> (libc keeps its fields private).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6(ip: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

fn configure_nic(s4: &OwnedFd, s6: &OwnedFd, current: &str, nic: &Nic) -> Result<()> {
    if current != nic.name {
        set_flags(s4, current, false)?;
        let mut r = ifreq(current);
        let mut newname = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in newname.iter_mut().zip(nic.name.bytes()) {
            *d = c_char(s);
        }
        r.ifr_ifru.ifru_newname = newname;
        ioctl(
            s4,
            libc::SIOCSIFNAME as _,
            &mut r,
            &format!("renaming {current} to {}", nic.name),
        )?;
    }
    let name = nic.name.as_str();
    if nic.mtu != 0 {
        let mut r = ifreq(name);
        r.ifr_ifru.ifru_mtu = libc::c_int::try_from(nic.mtu)
            .map_err(|_| invalid!("interface {name}: MTU {} is too large", nic.mtu))?;
        ioctl(
            s4,
            libc::SIOCSIFMTU as _,
            &mut r,
            &format!("MTU {} on {name}", nic.mtu),
        )?;
    }
    set_flags(s4, name, true)?;
    let mut v4 = 0;
    for (ip, prefix) in &nic.addresses {
        match ip {
            IpAddr::V4(ip) => {
                // Classic ioctls hold one IPv4 address per label: eth0,
                // eth0:1, ...
                let label = if v4 == 0 {
                    name.to_string()
                } else {
                    format!("{name}:{v4}")
                };
                if label.len() >= libc::IFNAMSIZ {
                    return Err(invalid!("too many IPv4 addresses on {name}"));
                }
                v4 += 1;
                let mut r = ifreq(&label);
                r.ifr_ifru.ifru_addr = sockaddr_in(*ip);
                ioctl(
                    s4,
                    libc::SIOCSIFADDR as _,
                    &mut r,
                    &format!("address {ip} on {label}"),
                )?;
                let mut r = ifreq(&label);
                r.ifr_ifru.ifru_netmask = sockaddr_in(mask(*prefix));
                ioctl(
                    s4,
                    libc::SIOCSIFNETMASK as _,
                    &mut r,
                    &format!("prefix /{prefix} on {label}"),
                )?;
            }
            IpAddr::V6(ip) => {
                let mut r = libc::in6_ifreq {
                    ifr6_addr: in6(*ip),
                    ifr6_prefixlen: u32::from(*prefix),
                    ifr6_ifindex: ifindex(name)?,
                };
                ioctl(
                    s6,
                    libc::SIOCSIFADDR as _,
                    &mut r,
                    &format!("address {ip}/{prefix} on {name}"),
                )?;
            }
        }
    }
    Ok(())
}

fn add_route(s4: &OwnedFd, s6: &OwnedFd, r: &Route) -> Result<()> {
    let v6 = match (r.destination, r.gateway) {
        (Some((d, _)), _) => d.is_ipv6(),
        (None, Some(g)) => g.is_ipv6(),
        (None, None) => false,
    };
    let what = format!(
        "route to {} via {} dev {}",
        r.destination
            .map_or("default".into(), |(d, p)| format!("{d}/{p}")),
        r.gateway.map_or("-".into(), |g| g.to_string()),
        r.device
    );
    if v6 {
        let mut m = In6Rtmsg {
            dst: in6(Ipv6Addr::UNSPECIFIED),
            src: in6(Ipv6Addr::UNSPECIFIED),
            gateway: in6(Ipv6Addr::UNSPECIFIED),
            kind: 0,
            dst_len: 0,
            src_len: 0,
            metric: 1,
            info: 0,
            flags: libc::RTF_UP as u32,
            ifindex: ifindex(&r.device)?,
        };
        if let Some((IpAddr::V6(d), p)) = r.destination {
            m.dst = in6(d);
            m.dst_len = u16::from(p);
        }
        if let Some(IpAddr::V6(g)) = r.gateway {
            m.gateway = in6(g);
            m.flags |= libc::RTF_GATEWAY as u32;
        }
        return ioctl(s6, libc::SIOCADDRT as _, &mut m, &what);
    }
    // SAFETY: rtentry is plain data; zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    let (dst, prefix) = match r.destination {
        Some((IpAddr::V4(d), p)) => (d, p),
        _ => (Ipv4Addr::UNSPECIFIED, 0),
    };
    rt.rt_dst = sockaddr_in(dst);
    rt.rt_genmask = sockaddr_in(mask(prefix));
    rt.rt_flags = libc::RTF_UP;
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    if let Some(IpAddr::V4(g)) = r.gateway {
        rt.rt_gateway = sockaddr_in(g);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    let dev =
        std::ffi::CString::new(r.device.as_str()).map_err(|_| invalid!("device {:?}", r.device))?;
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    ioctl(s4, libc::SIOCADDRT as _, &mut rt, &what)
}

fn add_neighbor(s4: &OwnedFd, n: &Neighbor) -> Result<()> {
    // SAFETY: arpreq is plain data; zero is valid.
    let mut a: libc::arpreq = unsafe { std::mem::zeroed() };
    a.arp_pa = sockaddr_in(n.address);
    a.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in a.arp_ha.sa_data.iter_mut().zip(n.mac) {
        *d = c_char(s);
    }
    a.arp_flags = libc::ATF_COM | libc::ATF_PERM;
    for (d, s) in a.arp_dev.iter_mut().zip(n.device.bytes()) {
        *d = c_char(s);
    }
    ioctl(
        s4,
        libc::SIOCSARP as _,
        &mut a,
        &format!("neighbour {} on {}", n.address, n.device),
    )
}

/// Applies `req`; returns the names of the interfaces configured.
pub fn configure(req: &api::ConfigureNetworkRequest) -> Result<Vec<String>> {
    let plan = plan(req)?;
    let nics = nics_by_mac()?;
    let mut current = Vec::new();
    for n in &plan.interfaces {
        let name = nics.get(&n.mac).ok_or_else(|| {
            not_found!(
                "no guest NIC has MAC {}",
                n.mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )
        })?;
        current.push(name.clone());
    }
    let s4 = socket(libc::AF_INET)?;
    let s6 = socket(libc::AF_INET6)?;
    for (n, cur) in plan.interfaces.iter().zip(&current) {
        configure_nic(&s4, &s6, cur, n)?;
    }
    for r in &plan.routes {
        add_route(&s4, &s6, r)?;
    }
    for n in &plan.neighbors {
        add_neighbor(&s4, n)?;
    }
    Ok(plan.interfaces.into_iter().map(|n| n.name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> api::ConfigureNetworkRequest {
        let mut r = api::ConfigureNetworkRequest::new();
        for i in v["interfaces"].as_array().into_iter().flatten() {
            let mut n = api::NetInterface::new();
            n.mac = i["mac"].as_str().unwrap_or_default().into();
            n.name = i["name"].as_str().unwrap_or_default().into();
            n.mtu = u32::try_from(i["mtu"].as_u64().unwrap_or(0)).unwrap();
            for a in i["addresses"].as_array().into_iter().flatten() {
                let mut ip = api::IpAddress::new();
                ip.address = a[0].as_str().unwrap_or_default().into();
                ip.prefix = u32::try_from(a[1].as_u64().unwrap_or(0)).unwrap();
                n.addresses.push(ip);
            }
            r.interfaces.push(n);
        }
        for x in v["routes"].as_array().into_iter().flatten() {
            let mut rt = api::NetRoute::new();
            rt.destination = x[0].as_str().unwrap_or_default().into();
            rt.gateway = x[1].as_str().unwrap_or_default().into();
            rt.device = x[2].as_str().unwrap_or_default().into();
            r.routes.push(rt);
        }
        for x in v["neighbors"].as_array().into_iter().flatten() {
            let mut nb = api::NetNeighbor::new();
            nb.address = x[0].as_str().unwrap_or_default().into();
            nb.mac = x[1].as_str().unwrap_or_default().into();
            nb.device = x[2].as_str().unwrap_or_default().into();
            r.neighbors.push(nb);
        }
        r
    }

    fn eth0() -> serde_json::Value {
        serde_json::json!({"mac": "02:00:0a:58:00:05", "name": "eth0", "mtu": 1500,
                           "addresses": [["10.88.0.5", 16], ["fd00::5", 64]]})
    }

    #[test]
    fn a_pod_network_plans() {
        let p = plan(&req(serde_json::json!({
            "interfaces": [eth0()],
            "routes": [["", "10.88.0.1", "eth0"], ["10.96.0.0/12", "", "eth0"], ["", "fd00::1", "eth0"]],
            "neighbors": [["10.88.0.1", "02:00:00:00:00:01", "eth0"]],
        })))
        .unwrap();
        assert_eq!(p.interfaces[0].mac, [2, 0, 0x0a, 0x58, 0, 5]);
        assert_eq!(
            p.interfaces[0].addresses[1],
            ("fd00::5".parse().unwrap(), 64)
        );
        assert_eq!(p.routes[0].destination, None);
        assert_eq!(
            p.routes[1].destination,
            Some(("10.96.0.0".parse().unwrap(), 12))
        );
        assert_eq!(mask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(mask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let cases = [
            (
                serde_json::json!({"interfaces": [{"mac": "zz", "name": "eth0"}]}),
                "MAC",
            ),
            (
                serde_json::json!({"interfaces": [{"mac": "02:00:00:00:00:01", "name": "a/b"}]}),
                "interface name",
            ),
            (
                serde_json::json!({"interfaces": [{"mac": "02:00:00:00:00:01", "name": "eth0", "mtu": 10}]}),
                "MTU",
            ),
            (
                serde_json::json!({"interfaces": [{"mac": "02:00:00:00:00:01", "name": "eth0", "addresses": [["10.0.0.1", 33]]}]}),
                "prefix",
            ),
            (
                serde_json::json!({"interfaces": [{"mac": "02:00:00:00:00:01", "name": "eth0", "addresses": [["ten", 8]]}]}),
                "not an IP",
            ),
            (
                serde_json::json!({"interfaces": [eth0()], "routes": [["", "10.88.0.1", "eth9"]]}),
                "unknown device",
            ),
            (
                serde_json::json!({"interfaces": [eth0()], "routes": [["10.0.0.0", "", "eth0"]]}),
                "CIDR",
            ),
            (
                serde_json::json!({"interfaces": [eth0()], "routes": [["", "", "eth0"]]}),
                "gateway",
            ),
            (
                serde_json::json!({"interfaces": [eth0()], "routes": [["fd01::/64", "10.0.0.1", "eth0"]]}),
                "families",
            ),
            (
                serde_json::json!({"interfaces": [eth0()], "neighbors": [["fd00::1", "02:00:00:00:00:01", "eth0"]]}),
                "IPv4",
            ),
        ];
        for (v, word) in cases {
            let e = plan(&req(v.clone())).unwrap_err().to_string();
            assert!(e.contains(word), "{v}: {e}");
        }
    }
}
