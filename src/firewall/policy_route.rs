//! Policy routing over netlink: per address family, one rule
//! `fwmark ROUTE_MARK lookup TABLE` and one route
//! `local default dev lo table TABLE`, which make captured packets count
//! as local so TPROXY can hand them to tproxyd.
//!
//! tproxyd's rules are recognised by (fwmark, table) and its routes by the
//! table, which is tproxyd's alone; nothing else is listed for deletion.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::{FirewallError, Plan};

fn netlink_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> FirewallError {
    let what = what.into();
    move |e| FirewallError::Netlink {
        what,
        detail: e.to_string(),
    }
}

/// A netlink connection on the current runtime.
fn connect() -> Result<Handle, FirewallError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| FirewallError::Netlink {
        what: "open a netlink socket".into(),
        detail: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_mark(r: &RuleMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RuleAttribute::FwMark(m) => Some(*m),
        _ => None,
    })
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// tproxyd's rules, per family, as the kernel reports them.
async fn own_rules(h: &Handle, plan: &Plan) -> Result<Vec<RuleMessage>, FirewallError> {
    let mut own = Vec::new();
    for ver in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<RuleMessage> = h
            .rule()
            .get(ver)
            .execute()
            .try_collect()
            .await
            .map_err(netlink_err("list ip rules"))?;
        own.extend(rules.into_iter().filter(|r| {
            rule_mark(r) == Some(plan.route_mark) && rule_table(r) == plan.route_table
        }));
    }
    Ok(own)
}

/// Routes in tproxyd's table, both families.
async fn own_routes(h: &Handle, plan: &Plan) -> Result<Vec<RouteMessage>, FirewallError> {
    let mut own = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(plan.route_table)
            .build(),
        RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(plan.route_table)
            .build(),
    ] {
        let routes: Vec<RouteMessage> = h
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink_err("list routes"))?;
        own.extend(
            routes
                .into_iter()
                .filter(|r| route_table(r) == plan.route_table),
        );
    }
    Ok(own)
}

/// Whether both families' rule and route are in place.
pub async fn present(plan: &Plan) -> Result<(usize, usize), FirewallError> {
    let h = connect()?;
    Ok((
        own_rules(&h, plan).await?.len(),
        own_routes(&h, plan).await?.len(),
    ))
}

/// Removes tproxyd's rules and routes; returns how many were removed.
pub async fn remove(plan: &Plan) -> Result<usize, FirewallError> {
    let h = connect()?;
    let mut removed = 0;
    for rule in own_rules(&h, plan).await? {
        h.rule()
            .del(rule)
            .execute()
            .await
            .map_err(netlink_err("delete tproxyd's ip rule"))?;
        removed += 1;
    }
    for route in own_routes(&h, plan).await? {
        h.route()
            .del(route)
            .execute()
            .await
            .map_err(netlink_err("delete a route in tproxyd's table"))?;
        removed += 1;
    }
    Ok(removed)
}

/// Whether `plan`'s rule and route are in place in both families, and
/// nothing else of tproxyd's is.
async fn in_place(h: &Handle, plan: &Plan, lo: u32) -> Result<bool, FirewallError> {
    let rules = own_rules(h, plan).await?;
    let routes = own_routes(h, plan).await?;
    let complete = [AddressFamily::Inet, AddressFamily::Inet6]
        .into_iter()
        .all(|family| {
            let rule = rules.iter().any(|r| {
                r.header.family == family
                    && r.header.action == RuleAction::ToTable
                    && r.attributes
                        .contains(&RuleAttribute::Priority(plan.rule_priority))
            });
            let route = routes.iter().any(|r| {
                r.header.address_family == family
                    && r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
                    && r.attributes.contains(&RouteAttribute::Oif(lo))
            });
            rule && route
        });
    Ok(complete && rules.len() == 2 && routes.len() == 2)
}

/// Puts tproxyd's rules and routes in place; returns whether it changed
/// anything. Rules and routes already as `plan` wants them are left
/// alone: removing and adding them again would leave a moment (a reload)
/// when captured packets are not routed to tproxyd but forwarded out
/// directly.
pub async fn apply(plan: &Plan) -> Result<bool, FirewallError> {
    let h = connect()?;
    let lo = h
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_next()
        .await
        .map_err(netlink_err("find the loopback interface"))?
        .map(|l| l.header.index)
        .ok_or_else(|| FirewallError::Netlink {
            what: "find the loopback interface".into(),
            detail: "no interface named lo".into(),
        })?;
    if in_place(&h, plan, lo).await? {
        return Ok(false);
    }
    remove(plan).await?;

    let result = async {
        // Without ToTable the kernel stores "lookup N none" and every
        // matching lookup fails with EINVAL.
        for v6 in [false, true] {
            let rule = h
                .rule()
                .add()
                .fw_mark(plan.route_mark)
                .table_id(plan.route_table)
                .priority(plan.rule_priority)
                .action(RuleAction::ToTable);
            let added = if v6 {
                rule.v6().execute().await
            } else {
                rule.v4().execute().await
            };
            let family = if v6 { "IPv6" } else { "IPv4" };
            added.map_err(netlink_err(format!("add the {family} fwmark rule")))?;
        }
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(plan.route_table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo)
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .build();
        h.route()
            .add(v4)
            .execute()
            .await
            .map_err(netlink_err("add the IPv4 local default route"))?;
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(plan.route_table)
            .kind(RouteType::Local)
            .output_interface(lo)
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .build();
        h.route()
            .add(v6)
            .execute()
            .await
            .map_err(netlink_err("add the IPv6 local default route"))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = remove(plan).await;
    }
    result.map(|()| true)
}
