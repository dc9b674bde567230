//! The routing that lets the app see its client's real address (ARCHITECTURE §8.2).
//!
//! ztunnel connects to a pod's app from inside the pod with the client's address as source: a
//! socket with `IP_TRANSPARENT` bound to an address the pod does not have, carrying the mark
//! [`CLIENT_MARK`]. The app's answers are addressed to that client, and the pod's main table
//! would send them out of its interface to the real client, who never opened that
//! connection. So the capture rules copy the mark onto the connection (`ct mark`) and back onto
//! the app's answers ([`super::rules`]), and this module adds, inside the pod's namespace:
//!
//! ```text
//! ip rule add fwmark 0x5747 lookup 22342 pref 32763          # and `ip -6 rule` alike
//! ip route add local 0.0.0.0/0 dev lo table 22342             # and `local ::/0`
//! ```
//!
//! so that marked packets are delivered inside the pod, where ztunnel's socket receives them.
//! Only those connections carry the mark: the pod's own traffic is routed as before. Each
//! family is set up only if the pod has a global address of it (a namespace may have IPv6
//! turned off). Installing is idempotent (the route is replaced, the rule added unless the
//! kernel already has it); removing deletes both and leaves the pod as it was.
//!
//! These are four fixed rtnetlink requests, written here on a netlink socket opened inside the
//! pod's namespace and answered at once (each request asks for an acknowledgement). A general
//! rtnetlink library was measured first: its message parsers added about 0.7 MB of code to
//! ztunnel and 0.7 MB (6%) to its resident memory at rest, for requests whose bytes never
//! change.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
};

use super::netns::Netns;
use super::scan;

/// The mark of ztunnel's sockets that connect to an app with the client's address ("WG"; the
/// bypass mark 0x5746 + 1). The capture rules let it out like the bypass mark and keep it on
/// the connection, so the app's answers carry it too.
pub const CLIENT_MARK: u32 = 0x5747;

/// The routing table, in each pod, that delivers marked packets locally (0x5746).
pub const ROUTE_TABLE: u32 = 0x5746;

/// The rule's priority: after the `local` table (0), before `main` (32766); Istio's ztunnel
/// uses 32764 for the same purpose, so the two never share one.
pub const RULE_PRIORITY: u32 = 32763;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot enter the pod's network namespace: {0}")]
    Netns(io::Error),
    #[error("{what} (rtnetlink in the pod's network namespace): {error}")]
    Netlink { what: String, error: io::Error },
}

/// Installs the rule and the local route in `netns` for each family the pod has a global
/// address of.
pub fn install(netns: &Netns) -> Result<(), RouteError> {
    netns
        .run(|| -> Result<(), RouteError> {
            let addresses = scan::addresses()
                .map_err(|error| RouteError::Netlink { what: "list the pod's addresses".into(), error })?;
            let nl = Netlink::open()?;
            let lo = loopback()?;
            for family in [Family::V4, Family::V6] {
                if !addresses.iter().any(|a| family.holds(a) && is_global(a)) {
                    continue;
                }
                nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &local_route(family, lo), &family.route_text())?;
                // NLM_F_EXCL: the kernel answers EEXIST for a rule it has, instead of a duplicate.
                match nl.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule(family), &family.rule_text()) {
                    Err(RouteError::Netlink { error, .. }) if error.raw_os_error() == Some(Errno::EEXIST as i32) => {}
                    other => other?,
                }
            }
            Ok(())
        })
        .map_err(RouteError::Netns)?
}

/// Removes the rules and routes [`install`] added (nothing to do if they are not there).
pub fn remove(netns: &Netns) -> Result<(), RouteError> {
    netns
        .run(|| -> Result<(), RouteError> {
            let nl = Netlink::open()?;
            let lo = loopback()?;
            // Absent (ENOENT, ESRCH), or a family this kernel does not have (EAFNOSUPPORT):
            // nothing to remove.
            let gone = [Errno::ENOENT, Errno::ESRCH, Errno::EAFNOSUPPORT].map(|e| e as i32);
            for family in [Family::V4, Family::V6] {
                for (kind, body, what) in [
                    (RTM_DELRULE, rule(family), family.rule_text()),
                    (RTM_DELROUTE, local_route(family, lo), family.route_text()),
                ] {
                    match nl.request(kind, 0, &body, &format!("delete {what}")) {
                        Err(RouteError::Netlink { error, .. })
                            if error.raw_os_error().is_some_and(|e| gone.contains(&e)) => {}
                        other => other?,
                    }
                }
            }
            Ok(())
        })
        .map_err(RouteError::Netns)?
}

/// The index of the calling thread's namespace's loopback interface.
fn loopback() -> Result<u32, RouteError> {
    nix::net::if_::if_nametoindex("lo")
        .map_err(|e| RouteError::Netlink { what: "find the loopback interface".into(), error: e.into() })
}

/// A global address: neither loopback nor link-local (an IPv4-only pod has an IPv6 link-local
/// address wherever IPv6 is on; that alone does not call for IPv6 routing).
fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc_af::INET,
            Family::V6 => libc_af::INET6,
        }
    }

    fn holds(self, ip: &IpAddr) -> bool {
        matches!((self, ip), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }

    fn route_text(self) -> String {
        let any = match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        };
        format!("route local {any} dev lo table {ROUTE_TABLE}")
    }

    fn rule_text(self) -> String {
        let ip = match self {
            Family::V4 => "ip",
            Family::V6 => "ip -6",
        };
        format!("{ip} rule fwmark {CLIENT_MARK:#x} lookup {ROUTE_TABLE} pref {RULE_PRIORITY}")
    }
}

/// Address family numbers of the kernel's ABI (`AF_INET`, `AF_INET6`).
mod libc_af {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

// rtnetlink message types and flags (linux/rtnetlink.h, linux/netlink.h).
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
// Attributes: of a route (RTA_*), of a rule (FRA_*).
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
// Values of the headers' fields.
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const FR_ACT_TO_TBL: u8 = 1;

/// `struct rtmsg` and attributes: `local <any> dev <lo> table ROUTE_TABLE`.
fn local_route(family: Family, lo: u32) -> Vec<u8> {
    // family, dst_len 0 (any), src_len, tos, table (in RTA_TABLE), protocol, scope, type; flags
    let mut body = vec![family.af(), 0, 0, 0, RT_TABLE_UNSPEC, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut body, RTA_TABLE, ROUTE_TABLE);
    attr(&mut body, RTA_OIF, lo);
    body
}

/// `struct fib_rule_hdr` and attributes: `fwmark CLIENT_MARK lookup ROUTE_TABLE pref RULE_PRIORITY`.
fn rule(family: Family) -> Vec<u8> {
    // family, dst_len, src_len, tos, table (in FRA_TABLE), res1, res2, action; flags
    let mut body = vec![family.af(), 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    attr(&mut body, FRA_FWMARK, CLIENT_MARK);
    attr(&mut body, FRA_FWMASK, u32::MAX);
    attr(&mut body, FRA_TABLE, ROUTE_TABLE);
    body
}

/// Appends a `u32` attribute (`struct rtattr`: length, type, value; 8 bytes, already aligned).
fn attr(body: &mut Vec<u8>, kind: u16, value: u32) {
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&kind.to_ne_bytes());
    body.extend_from_slice(&value.to_ne_bytes());
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> Result<Netlink, RouteError> {
        let fail = |e: Errno| RouteError::Netlink { what: "open a netlink socket".into(), error: e.into() };
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)
            .map_err(fail)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(fail)?;
        Ok(Netlink { fd })
    }

    /// Sends one request asking for an acknowledgement and returns the kernel's answer: `Ok`
    /// for an acknowledgement, the error it reports otherwise.
    fn request(&self, kind: u16, flags: u16, body: &[u8], what: &str) -> Result<(), RouteError> {
        let fail = |error: io::Error| RouteError::Netlink { what: what.to_owned(), error };
        let len = u32::try_from(16 + body.len()).map_err(|_| fail(io::ErrorKind::InvalidInput.into()))?;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number: one request at a time
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(body);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(|e| fail(e.into()))?;
        // The answer: an NLMSG_ERROR message, whose error is 0 for an acknowledgement. It holds
        // the request's header after the error (the body is left out with NLM_F_ACK's cap).
        let mut answer = [0u8; 1024];
        let n = recv(self.fd.as_raw_fd(), &mut answer, MsgFlags::empty()).map_err(|e| fail(e.into()))?;
        let field = |at: usize, len: usize| answer.get(at..at + len).filter(|_| at + len <= n);
        let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let error = field(16, 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match (kind, error) {
            (Some(NLMSG_ERROR), Some(0)) => Ok(()),
            (Some(NLMSG_ERROR), Some(e)) => Err(fail(io::Error::from_raw_os_error(-e))),
            _ => Err(fail(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected answer of {n} bytes")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of the rule are those `ip rule add fwmark 0x5747 lookup 22342 pref 32763`
    /// sends (its header, then priority, mark, mask and table as 8-byte attributes).
    #[test]
    fn the_rule_and_the_route_are_the_documented_ones() {
        let r = rule(Family::V4);
        assert_eq!(&r[..8], &[2, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]);
        assert_eq!(r.len(), 12 + 4 * 8);
        let attrs: Vec<(u16, u32)> = r[12..]
            .chunks(8)
            .map(|a| (u16::from_ne_bytes([a[2], a[3]]), u32::from_ne_bytes([a[4], a[5], a[6], a[7]])))
            .collect();
        assert_eq!(attrs, [(FRA_PRIORITY, 32763), (FRA_FWMARK, 0x5747), (FRA_FWMASK, u32::MAX), (FRA_TABLE, 0x5746)]);
        let route = local_route(Family::V6, 1);
        assert_eq!(&route[..8], &[10, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL]);
        assert_eq!(Family::V6.rule_text(), "ip -6 rule fwmark 0x5747 lookup 22342 pref 32763");
        assert!(is_global(&"10.244.1.2".parse().unwrap()) && is_global(&"fd00:244:1::2".parse().unwrap()));
        assert!(!is_global(&"fe80::1".parse().unwrap()) && !is_global(&"127.0.0.1".parse().unwrap()));
    }
}
