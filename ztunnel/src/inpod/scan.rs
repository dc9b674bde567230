//! Finding a running pod's network namespace without restarting it (ARCHITECTURE §8): every
//! distinct namespace of a process in `/proc/*/ns/net` is entered and its interface
//! addresses compared with the pod's IPs.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::netns::Netns;

/// The namespace holding one of `ips`, if a process on this host lives in it.
pub fn find_netns(proc_root: &Path, ips: &[IpAddr]) -> io::Result<Option<Netns>> {
    let host = Netns::host()?;
    let mut seen = HashSet::from([host.inode()]);
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // Processes come and go while we scan: skip whatever vanished.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if !seen.insert(meta.ino()) {
            continue;
        }
        let Ok(netns) = Netns::open(&path) else { continue };
        let found = netns.run(|| addresses().map(|addrs| addrs.iter().any(|a| ips.contains(a))))?;
        if found.unwrap_or(false) {
            return Ok(Some(netns));
        }
    }
    Ok(None)
}

/// The addresses of the current thread's network namespace.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}
