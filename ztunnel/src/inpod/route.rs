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
//! turned off).
//! Installing is idempotent (the route is replaced, the rule added only when missing);
//! removing deletes both and leaves the pod as it was.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::netns::Netns;

/// The mark of ztunnel's sockets that connect to an app with the client's address ("WG"; the
/// bypass mark 0x5746 + 1). The capture rules let it out like the bypass mark and keep it on
/// the connection, so the app's answers carry it too.
pub const CLIENT_MARK: u32 = 0x5747;

/// The routing table, in each pod, that delivers marked packets locally (0x5746).
pub const ROUTE_TABLE: u32 = 0x5746;

/// The rule's priority: after the `local` table (0), before `main` (32766); Istio's ztunnel
/// uses 32764 for the same purpose, so the two never share one.
pub const RULE_PRIORITY: u32 = 32763;

/// Bound on one batch of netlink requests (the kernel answers in microseconds).
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot enter the pod's network namespace: {0}")]
    Netns(io::Error),
    #[error("{what} (rtnetlink in the pod's network namespace): {error}")]
    Netlink { what: String, error: String },
}

fn failed(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    let what = what.into();
    move |e| RouteError::Netlink { what, error: e.to_string() }
}

/// Installs the rule and the local route in `netns` for each family the pod has a global
/// address of. Blocking: call it from a blocking thread.
pub fn install(netns: &Netns) -> Result<(), RouteError> {
    in_netns(netns, move |handle: Handle| async move {
        let lo = loopback(&handle).await?;
        let (v4, v6) = families(&handle).await?;
        if v4 {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0);
            add_local_route(&handle, route.output_interface(lo).build(), "0.0.0.0/0").await?;
            add_rule(&handle, IpVersion::V4).await?;
        }
        if v6 {
            let route = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0);
            add_local_route(&handle, route.output_interface(lo).build(), "::/0").await?;
            add_rule(&handle, IpVersion::V6).await?;
        }
        Ok(())
    })
}

/// Removes the rules and routes [`install`] added (nothing to do if they are not there).
pub fn remove(netns: &Netns) -> Result<(), RouteError> {
    in_netns(netns, move |handle: Handle| async move {
        for version in [IpVersion::V4, IpVersion::V6] {
            // A kernel without IPv6 cannot list IPv6 rules, and install added none there.
            let rules = match ours(&handle, version.clone()).await {
                Ok(rules) => rules,
                Err(_) if version == IpVersion::V6 => continue,
                Err(e) => return Err(e),
            };
            for rule in rules {
                handle.rule().del(rule).execute().await.map_err(failed("delete the client-address rule"))?;
            }
            let routes: Vec<_> = handle
                .route()
                .get(match version {
                    IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().table_id(ROUTE_TABLE).build(),
                    IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().table_id(ROUTE_TABLE).build(),
                })
                .execute()
                .try_collect()
                .await
                .map_err(failed("list the routes"))?;
            for route in routes.into_iter().filter(|r| table_of(r) == ROUTE_TABLE) {
                handle.route().del(route).execute().await.map_err(failed("delete the client-address route"))?;
            }
        }
        Ok(())
    })
}

/// Whether `netns` has the client-address rule for IPv4 (for tests).
pub fn installed(netns: &Netns) -> Result<bool, RouteError> {
    in_netns(netns, move |handle: Handle| async move { Ok(!ours(&handle, IpVersion::V4).await?.is_empty()) })
}

/// Runs `f` with a netlink handle opened inside `netns`, on a runtime of its own.
fn in_netns<T, F, Fut>(netns: &Netns, f: F) -> Result<T, RouteError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, RouteError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RouteError::Netlink { what: "start a netlink runtime".into(), error: e.to_string() })?;
    runtime.block_on(async {
        // The socket belongs to the namespace it is opened in; it is opened inside the pod's,
        // and the thread returns to ztunnel's at once.
        let (connection, handle, _) = netns
            .run(rtnetlink::new_connection)
            .map_err(RouteError::Netns)?
            .map_err(|e| RouteError::Netlink { what: "open a netlink socket".into(), error: e.to_string() })?;
        let driver = tokio::spawn(connection);
        let result = tokio::time::timeout(TIMEOUT, f(handle)).await;
        driver.abort();
        result.map_err(|_| RouteError::Netlink {
            what: "netlink requests".into(),
            error: format!("no answer within {TIMEOUT:?}"),
        })?
    })
}

/// Whether the namespace has global IPv4 and IPv6 addresses (link-local ones do not count: an
/// IPv4-only pod has an IPv6 link-local address wherever IPv6 is on).
async fn families(handle: &Handle) -> Result<(bool, bool), RouteError> {
    let addresses: Vec<_> =
        handle.address().get().execute().try_collect().await.map_err(failed("list the pod's addresses"))?;
    let global = |family| {
        addresses.iter().any(|a: &netlink_packet_route::address::AddressMessage| {
            a.header.family == family && a.header.scope == netlink_packet_route::address::AddressScope::Universe
        })
    };
    Ok((global(AddressFamily::Inet), global(AddressFamily::Inet6)))
}

async fn loopback(handle: &Handle) -> Result<u32, RouteError> {
    let mut links = handle.link().get().match_name("lo".to_owned()).execute();
    match links.try_next().await.map_err(failed("find the loopback interface"))? {
        Some(link) => Ok(link.header.index),
        None => Err(RouteError::Netlink { what: "find the loopback interface".into(), error: "no `lo`".into() }),
    }
}

/// `ip route replace local <prefix> dev lo table ROUTE_TABLE`.
async fn add_local_route(
    handle: &Handle,
    mut route: netlink_packet_route::route::RouteMessage,
    prefix: &str,
) -> Result<(), RouteError> {
    route.header.kind = RouteType::Local;
    route.header.scope = RouteScope::Host;
    route.header.table = 0;
    route.attributes.push(netlink_packet_route::route::RouteAttribute::Table(ROUTE_TABLE));
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(failed(format!("add route local {prefix} dev lo table {ROUTE_TABLE}")))
}

/// `ip rule add fwmark CLIENT_MARK lookup ROUTE_TABLE pref RULE_PRIORITY`, unless it is there.
async fn add_rule(handle: &Handle, version: IpVersion) -> Result<(), RouteError> {
    if !ours(handle, version.clone()).await?.is_empty() {
        return Ok(());
    }
    let add = handle.rule().add().fw_mark(CLIENT_MARK).table_id(ROUTE_TABLE).priority(RULE_PRIORITY);
    let add = add.action(RuleAction::ToTable);
    let what = format!("add rule fwmark {CLIENT_MARK:#x} lookup {ROUTE_TABLE} pref {RULE_PRIORITY}");
    match version {
        IpVersion::V4 => add.v4().execute().await,
        IpVersion::V6 => add.v6().execute().await,
    }
    .map_err(failed(what))
}

/// The rules of `version` that are ours (our priority, mark and table).
async fn ours(handle: &Handle, version: IpVersion) -> Result<Vec<RuleMessage>, RouteError> {
    let family = match version {
        IpVersion::V4 => AddressFamily::Inet,
        IpVersion::V6 => AddressFamily::Inet6,
    };
    let rules: Vec<RuleMessage> =
        handle.rule().get(version).execute().try_collect().await.map_err(failed("list the routing rules"))?;
    Ok(rules
        .into_iter()
        .filter(|r| r.header.family == family)
        .filter(|r| {
            let has = |wanted: &RuleAttribute| r.attributes.iter().any(|a| a == wanted);
            has(&RuleAttribute::Priority(RULE_PRIORITY))
                && has(&RuleAttribute::FwMark(CLIENT_MARK))
                && (has(&RuleAttribute::Table(ROUTE_TABLE)) || u32::from(r.header.table) == ROUTE_TABLE)
        })
        .collect())
}

fn table_of(route: &netlink_packet_route::route::RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            netlink_packet_route::route::RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}
