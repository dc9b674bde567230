//! Packet capture inside a lab namespace, in Rust (no tcpdump): an `AF_PACKET` socket records the
//! frames of every interface of the namespace on a background thread; [`Capture::stop`] returns
//! the IPv4/TCP ones, parsed, and [`Capture::stop_all`] the IPv4 and IPv6 ones.
//!
//! On the fabric (see [`Lab::capture`](crate::Lab::capture)) the interfaces are the bridge's
//! ports, one per node, so a frame from node 0 to node 1 is seen **twice**: received on port
//! `node0` ([`Packet::outgoing`] false) and sent on port `node1` (true). Filter on `!outgoing` to
//! see each frame once.
//!
//! The capture is a test instrument, not a data-path component: its memory is bounded
//! ([`MAX_CAPTURE_BYTES`]) and its duration too ([`MAX_CAPTURE_DURATION`]). Under heavy traffic
//! the kernel may drop frames from the capture socket (never from the data path), so assert on
//! small exchanges. Segments are as the stack handed them to the interface: with offloads, one
//! captured "packet" may carry several MSS worth of payload, and checksums may be unfinished.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{LinkAddr, recvfrom};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netlink::netlink;
use crate::{LabError, Netns};

/// The most payload (plus a small per-packet overhead) one capture keeps: 64 MiB.
pub const MAX_CAPTURE_BYTES: usize = 64 << 20;

/// A capture stops recording by itself after this long (a forgotten capture must not run for
/// the rest of a long benchmark).
pub const MAX_CAPTURE_DURATION: Duration = Duration::from_secs(600);

/// `ETH_P_ALL`: every protocol, for the packet socket.
const ETH_P_ALL: u16 = 0x0003;
/// `sll_pkttype` of a frame this host sent.
const PACKET_OUTGOING: u8 = 4;
/// How often the recording thread checks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Receive buffer asked for, so that bursts are not dropped before the thread reads them.
const SOCKET_BUFFER: usize = 8 << 20;
/// Largest frame read: 64 KiB segments (GSO/GRO on veths) plus headers.
const FRAME_BUFFER: usize = 128 << 10;
/// Accounted per packet on top of its payload, for the memory bound.
const PACKET_OVERHEAD: usize = 96;

/// A running capture. Dropping it stops the recording thread and discards the packets.
pub struct Capture {
    netns: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<IpPacket>, LabError>>>,
}

/// One captured IPv4/TCP segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Packet {
    /// The interface it was seen on (a bridge port on the fabric: `node0`, `node1`, ...).
    pub interface: String,
    /// True when seen leaving the interface, false when seen arriving (see the module docs).
    pub outgoing: bool,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// TCP flags.
    pub flags: TcpFlags,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP payload (may be empty).
    pub payload: Vec<u8>,
}

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (src, dst) = (SocketAddr::V4(self.src), SocketAddr::V4(self.dst));
        segment(f, &self.interface, self.outgoing, src, dst, self.flags, self.seq, self.payload.len())
    }
}

/// A segment as the captures' `Debug` show it: `node0 in 10.255.0.1:5 -> ... [S] seq=1 len=0`.
#[allow(clippy::too_many_arguments)]
fn segment(
    f: &mut fmt::Formatter<'_>,
    interface: &str,
    outgoing: bool,
    src: SocketAddr,
    dst: SocketAddr,
    flags: TcpFlags,
    seq: u32,
    len: usize,
) -> fmt::Result {
    let direction = if outgoing { "out" } else { "in" };
    write!(f, "{interface} {direction} {src} -> {dst} [{flags}] seq={seq} len={len}")
}

/// One captured TCP segment of either family: what [`Capture::stop_all`] returns. [`Packet`]
/// is its IPv4-only form.
#[derive(Clone, PartialEq, Eq)]
pub struct IpPacket {
    /// The interface it was seen on (a bridge port on the fabric: `node0`, `node1`, ...).
    pub interface: String,
    /// True when seen leaving the interface, false when seen arriving (see the module docs).
    pub outgoing: bool,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// TCP flags.
    pub flags: TcpFlags,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP payload (may be empty).
    pub payload: Vec<u8>,
}

impl IpPacket {
    /// The IPv4 form, or `None` for an IPv6 segment.
    pub fn to_v4(&self) -> Option<Packet> {
        match (self.src, self.dst) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => Some(Packet {
                interface: self.interface.clone(),
                outgoing: self.outgoing,
                src,
                dst,
                flags: self.flags,
                seq: self.seq,
                payload: self.payload.clone(),
            }),
            _ => None,
        }
    }
}

impl fmt::Debug for IpPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        segment(f, &self.interface, self.outgoing, self.src, self.dst, self.flags, self.seq, self.payload.len())
    }
}

/// The flags byte of a TCP header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN: the sender has finished sending.
    pub const FIN: u8 = 0x01;
    /// SYN: connection opening.
    pub const SYN: u8 = 0x02;
    /// RST: connection reset.
    pub const RST: u8 = 0x04;
    /// PSH: push buffered data to the application.
    pub const PSH: u8 = 0x08;
    /// ACK: the acknowledgment number is valid.
    pub const ACK: u8 = 0x10;

    /// FIN is set.
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    /// SYN is set.
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    /// RST is set.
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    /// PSH is set.
    pub fn psh(self) -> bool {
        self.0 & Self::PSH != 0
    }
    /// ACK is set.
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [(Self::SYN, 'S'), (Self::FIN, 'F'), (Self::RST, 'R'), (Self::PSH, 'P'), (Self::ACK, '.')];
        for (bit, c) in names {
            if self.0 & bit != 0 {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpFlags({self})")
    }
}

impl Netns {
    /// Starts capturing every frame on every interface of this namespace; see the module docs.
    pub fn capture(&self) -> Result<Capture, LabError> {
        let netns = self.name().to_owned();
        let names: HashMap<u32, String> =
            netlink(self, |nl| async move { nl.state().await })?.links.into_iter().map(|l| (l.index, l.name)).collect();
        let protocol = Protocol::from(i32::from(ETH_P_ALL.to_be()));
        let socket =
            self.run_named("capture", || Socket::new(Domain::PACKET, Type::RAW, Some(protocol)))?.map_err(|e| {
                LabError::Capture { netns: netns.clone(), step: "open an AF_PACKET socket".to_owned(), source: e }
            })?;
        let capture_err =
            |step: &str, source| LabError::Capture { netns: netns.clone(), step: step.to_owned(), source };
        // A smaller buffer only means drops under load, which the docs warn about: not fatal.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        socket.set_read_timeout(Some(STOP_POLL)).map_err(|e| capture_err("set the read timeout", e))?;

        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let netns = netns.clone();
            thread::Builder::new()
                .name("lab-capture".to_owned())
                .spawn(move || record(&socket, &netns, &names, &stop))
                .map_err(|e| capture_err("start the recording thread", e))?
        };
        Ok(Capture { netns, stop, thread: Some(thread) })
    }
}

impl Capture {
    /// Stops recording and returns the IPv4/TCP packets seen, in arrival order. Fails if the
    /// capture broke or reached a bound (a partial capture would make assertions lie).
    pub fn stop(self) -> Result<Vec<Packet>, LabError> {
        Ok(self.stop_all()?.iter().filter_map(IpPacket::to_v4).collect())
    }

    /// Stops recording and returns the TCP packets seen over IPv4 and IPv6, in arrival order;
    /// fails as [`Capture::stop`] does.
    pub fn stop_all(mut self) -> Result<Vec<IpPacket>, LabError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Err(LabError::Thread {
                netns: self.netns.clone(),
                what: "capture".to_owned(),
                problem: "was already stopped".to_owned(),
            }),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The recording loop, bounded by the stop flag, [`MAX_CAPTURE_DURATION`] and
/// [`MAX_CAPTURE_BYTES`].
fn record(
    socket: &Socket,
    netns: &str,
    names: &HashMap<u32, String>,
    stop: &AtomicBool,
) -> Result<Vec<IpPacket>, LabError> {
    let started = Instant::now();
    let mut frame = vec![0u8; FRAME_BUFFER];
    let mut packets = Vec::new();
    let mut kept = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if started.elapsed() >= MAX_CAPTURE_DURATION {
            let bound = format!("its time bound of {MAX_CAPTURE_DURATION:?}");
            return Err(LabError::CaptureTruncated { netns: netns.to_owned(), bound });
        }
        let (len, from) = match recvfrom::<LinkAddr>(socket.as_raw_fd(), &mut frame) {
            Ok(received) => received,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => {
                return Err(LabError::Capture {
                    netns: netns.to_owned(),
                    step: "receive a frame".to_owned(),
                    source: e.into(),
                });
            }
        };
        let Some(tcp) = parse_frame(&frame[..len.min(frame.len())]) else { continue };
        kept += tcp.payload.len() + PACKET_OVERHEAD;
        if kept > MAX_CAPTURE_BYTES {
            let bound = format!("its memory bound of {MAX_CAPTURE_BYTES} bytes");
            return Err(LabError::CaptureTruncated { netns: netns.to_owned(), bound });
        }
        let (interface, outgoing) = match from {
            Some(addr) => {
                let index = u32::try_from(addr.ifindex()).unwrap_or(0);
                let name = names.get(&index).cloned().unwrap_or_else(|| format!("if{index}"));
                (name, addr.pkttype() == PACKET_OUTGOING)
            }
            None => (String::from("?"), false),
        };
        packets.push(IpPacket {
            interface,
            outgoing,
            src: tcp.src,
            dst: tcp.dst,
            flags: tcp.flags,
            seq: tcp.seq,
            payload: tcp.payload.to_vec(),
        });
    }
    Ok(packets)
}

/// An IPv4 or IPv6 TCP segment inside an Ethernet frame, borrowing the frame.
#[derive(Debug, PartialEq, Eq)]
struct TcpSegment<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    flags: TcpFlags,
    seq: u32,
    payload: &'a [u8],
}

/// Parses Ethernet (optionally one VLAN tag) / IPv4 or IPv6 / TCP; `None` for anything else,
/// for non-first fragments, for IPv6 with extension headers before TCP (the lab's traffic has
/// none) and for truncated headers.
fn parse_frame(frame: &[u8]) -> Option<TcpSegment<'_>> {
    const ETHERTYPE_IPV4: u16 = 0x0800;
    const ETHERTYPE_IPV6: u16 = 0x86dd;
    const ETHERTYPE_VLAN: u16 = 0x8100;

    let mut offset = 12;
    let mut ethertype = be16(frame, offset)?;
    offset += 2;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, offset + 2)?;
        offset += 4;
    }
    let ip = frame.get(offset..)?;
    let (src_ip, dst_ip, tcp) = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(ip)?,
        ETHERTYPE_IPV6 => parse_ipv6(ip)?,
        _ => return None,
    };
    let data_offset = usize::from(*tcp.get(12)? >> 4) * 4;
    if data_offset < 20 || tcp.len() < data_offset {
        return None;
    }
    Some(TcpSegment {
        src: SocketAddr::new(src_ip, be16(tcp, 0)?),
        dst: SocketAddr::new(dst_ip, be16(tcp, 2)?),
        flags: TcpFlags(tcp[13]),
        seq: u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?),
        payload: &tcp[data_offset..],
    })
}

const IPPROTO_TCP: u8 = 6;

/// An IPv4 packet's addresses and TCP bytes (header and payload, without Ethernet padding).
fn parse_ipv4(ip: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    let version_ihl = *ip.first()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    // Total length 0 happens for segments above 64 KiB (BIG TCP): then the frame tells.
    let total = match usize::from(be16(ip, 2)?) {
        0 => ip.len(),
        n => n.min(ip.len()),
    };
    if ip[9] != IPPROTO_TCP || be16(ip, 6)? & 0x1fff != 0 || total < ihl {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((src.into(), dst.into(), ip.get(ihl..total)?))
}

/// An IPv6 packet's addresses and TCP bytes, when TCP is its first next header.
fn parse_ipv6(ip: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    const HEADER: usize = 40;
    if *ip.first()? >> 4 != 6 || ip.len() < HEADER || ip[6] != IPPROTO_TCP {
        return None;
    }
    // Payload length 0 is a jumbogram (BIG TCP): then the frame tells.
    let end = match usize::from(be16(ip, 4)?) {
        0 => ip.len(),
        n => (HEADER + n).min(ip.len()),
    };
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
    Some((src.into(), dst.into(), ip.get(HEADER..end)?))
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 + TCP with `payload`, then `padding` trailing bytes (Ethernet padding).
    fn frame(vlan: bool, flags: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        let mut f = vec![0xaa; 12];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 24 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 2];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 24];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&8080u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&7u32.to_be_bytes());
        tcp[12] = 6 << 4; // 24-byte header: one option word
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f.extend(std::iter::repeat_n(0u8, padding));
        f
    }

    #[test]
    fn parses_tcp_payload_and_ignores_padding() {
        let f = frame(false, TcpFlags::PSH | TcpFlags::ACK, b"hello", 9);
        let seg = parse_frame(&f).expect("a TCP segment");
        assert_eq!(seg.src, "10.244.1.2:40000".parse().unwrap());
        assert_eq!(seg.dst, "10.244.2.2:8080".parse().unwrap());
        assert_eq!(seg.seq, 7);
        assert!(seg.flags.psh() && seg.flags.ack() && !seg.flags.syn());
        assert_eq!(seg.payload, b"hello");
        assert_eq!(seg.flags.to_string(), "P.");
    }

    /// Ethernet + IPv6 + TCP with `payload`, then `padding` trailing bytes.
    fn frame6(next_header: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        let mut f = vec![0xaa; 12];
        f.extend_from_slice(&[0x86, 0xdd]);
        let mut ip = vec![0x60, 0, 0, 0, 0, 0, next_header, 64];
        ip[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&"fd00:244:1::2".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"fd00:244:2::2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TcpFlags::PSH | TcpFlags::ACK;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f.extend(std::iter::repeat_n(0u8, padding));
        f
    }

    #[test]
    fn parses_ipv6() {
        let f = frame6(6, b"\x16\x03\x01", 5);
        let seg = parse_frame(&f).expect("a TCP segment");
        assert_eq!(seg.src, "[fd00:244:1::2]:40000".parse().unwrap());
        assert_eq!(seg.dst, "[fd00:244:2::2]:15008".parse().unwrap());
        assert_eq!(seg.payload, b"\x16\x03\x01");
        // UDP, or a hop-by-hop header before TCP, is not parsed; nor is a truncated header.
        assert_eq!(parse_frame(&frame6(17, b"x", 0)), None);
        assert_eq!(parse_frame(&frame6(0, b"x", 0)), None);
        let f = frame6(6, b"", 0);
        for cut in 0..14 + 40 + 20 {
            assert_eq!(parse_frame(&f[..cut]), None, "cut at {cut}");
        }
        let packet = IpPacket {
            interface: "node0".into(),
            outgoing: false,
            src: seg.src,
            dst: seg.dst,
            flags: seg.flags,
            seq: 0,
            payload: Vec::new(),
        };
        assert_eq!(packet.to_v4(), None);
    }

    #[test]
    fn parses_vlan_tagged() {
        let f = frame(true, TcpFlags::SYN, b"", 0);
        let seg = parse_frame(&f).expect("a TCP segment");
        assert!(seg.flags.syn());
        assert!(seg.payload.is_empty());
    }

    #[test]
    fn skips_other_and_truncated() {
        let mut arp = frame(false, 0, b"", 0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_frame(&arp), None);
        let mut udp = frame(false, 0, b"x", 0);
        udp[14 + 9] = 17;
        assert_eq!(parse_frame(&udp), None);
        let mut fragment = frame(false, 0, b"x", 0);
        fragment[14 + 7] = 0x10;
        assert_eq!(parse_frame(&fragment), None);
        let f = frame(false, 0, b"abc", 0);
        for cut in 0..14 + 20 + 24 {
            assert_eq!(parse_frame(&f[..cut]), None, "cut at {cut}");
        }
        assert!(parse_frame(&[]).is_none());
    }
}
