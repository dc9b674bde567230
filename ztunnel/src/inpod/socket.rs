//! Sockets inside pods' network namespaces: listeners for the captured ports and outbound
//! sockets carrying ztunnel's bypass mark, plus reading a redirected connection's original
//! destination.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::netns::Netns;
use super::route::CLIENT_MARK;
use crate::config::BYPASS_MARK;

/// Backlog of the captured ports: a burst of new connections from a busy pod must not see
/// SYNs dropped.
const LISTEN_BACKLOG: i32 = 1024;

/// Opens a listener on `port` of every address of one family inside `netns`: `0.0.0.0` when
/// `ipv6` is false, `[::]` (IPv6 only: IPv4 has its own listener) when it is true. Must be
/// called from the runtime (the socket is registered with it after the namespace switch).
pub fn listen(netns: &Netns, port: u16, ipv6: bool) -> io::Result<TcpListener> {
    let std_listener = netns.run(|| -> io::Result<std::net::TcpListener> {
        let (domain, any) = if ipv6 {
            (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        } else {
            (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        if ipv6 {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&any.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(socket.into())
    })??;
    TcpListener::from_std(std_listener)
}

/// Connects to `dst` from inside `netns`, with the bypass mark so the pod's capture rules let
/// the connection out (its source address is the pod's).
pub async fn connect(netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    let std_stream = netns.run(|| -> io::Result<std::net::TcpStream> {
        let domain = if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.set_mark(BYPASS_MARK)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        Ok(socket.into())
    })??;
    TcpSocket::from_std_stream(std_stream).connect(dst).await
}

/// Connects to `dst`, an address of the pod `netns` belongs to, from inside it with `client`
/// as the source address: an `IP_TRANSPARENT` socket bound to an address the pod does not
/// have, so the app sees its real client. It carries [`CLIENT_MARK`], which the pod's rules and
/// routes ([`super::route`]) use to bring the app's answers back to this socket.
///
/// The source port is chosen when it connects (`IP_BIND_ADDRESS_NO_PORT`), among the ports
/// free for this client and `dst` only. A port chosen at `bind` would have to be free for the
/// client address as a whole, and this side closes first (it passes the client's FIN on), so
/// every connection leaves its port in TIME_WAIT for a minute: a busy client would use up the
/// port range for all its destinations and then fail to connect.
pub async fn connect_as(netns: &Netns, client: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let std_stream = netns.run(|| -> io::Result<std::net::TcpStream> {
        let socket = if dst.is_ipv4() {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_ip_transparent_v4(true)?;
            socket
        } else {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            socket.set_ip_transparent_v6(true)?;
            socket
        };
        socket.set_mark(CLIENT_MARK)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        socket.bind(&SocketAddr::new(client, 0).into())?;
        Ok(socket.into())
    })??;
    TcpSocket::from_std_stream(std_stream).connect(dst).await
}

/// The destination a redirected connection was originally sent to (SO_ORIGINAL_DST).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
        }
    }
}
