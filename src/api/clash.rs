//! The REST half of the Clash API: what metacubexd, zashboard and yacd
//! call, with every field they read (facts: ROUTING_SNIFF_DNS_API.md 1).
//!
//! Where tproxyd has no such thing (providers, modes, ports other than its
//! own), the answer is the neutral value a dashboard accepts, never an
//! error: a 404 on `/providers/proxies` breaks metacubexd's proxies page.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::{error, query_param, ApiState, DelayRecord};
use crate::config::{Mode, Network};
use crate::live::ReloadError;
use crate::outbound::group::{self, GroupKind};
use crate::outbound::Outbound;
use crate::policy::{Named, Policy};
use crate::registry::{EndReason, Flow};

/// The name of the synthetic group that lists every outbound: all three
/// dashboards order their groups by `proxies.GLOBAL.all`.
pub const GLOBAL: &str = "GLOBAL";

/// Longest delay test a client may ask for.
const MAX_DELAY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DELAY_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn version() -> Json<Value> {
    // "meta": true is what mihomo answers; zashboard then shows its
    // mihomo UI, whose extra endpoints answer 404 here, never hang.
    Json(json!({
        "meta": true,
        "version": format!("tproxyd {}", env!("CARGO_PKG_VERSION")),
    }))
}

pub async fn get_configs(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let cfg = st.live.config();
    let port = cfg.listen.port();
    let (redir, tproxy) = match cfg.mode {
        Mode::Tproxy => (0, port),
        Mode::Redirect => (port, 0),
    };
    Json(json!({
        "port": 0,
        "socks-port": 0,
        "redir-port": redir,
        "tproxy-port": tproxy,
        "mixed-port": 0,
        "tun": { "enable": false },
        "allow-lan": true,
        "bind-address": "*",
        "mode": "rule",
        "mode-list": ["rule"],
        "modes": ["rule"],
        "log-level": super::logs::hub().level_name(),
        "ipv6": true,
        "sniffing": st.live.router.policy().wants_sniffing(),
        "tcp-concurrent": false,
        "interface-name": "",
        "unified-delay": false,
    }))
}

/// Accepts any object and changes nothing: tproxyd has one mode (rules),
/// its ports and log level come from its file and command line. mihomo
/// answers 204 too, and a dashboard that gets 400 for a field it sent
/// would show an error for a harmless click.
pub async fn patch_configs(body: Bytes) -> Response {
    if !body.is_empty() && serde_json::from_slice::<Value>(&body).is_err() {
        return error(StatusCode::BAD_REQUEST, "Body invalid");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Reload: the file is read again and applied, or refused with every
/// problem named while the running configuration stays.
pub async fn put_configs(State(st): State<Arc<ApiState>>, body: Bytes) -> Response {
    if !body.is_empty() {
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return error(StatusCode::BAD_REQUEST, "Body invalid");
        };
        let given = |key: &str| v.get(key).and_then(Value::as_str).unwrap_or("");
        if !given("payload").is_empty() || !given("path").is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "tproxyd reloads the TOML file it was started with; it takes neither a path nor \
                 a payload. Edit that file and reload with an empty body",
            );
        }
    }
    match st.live.reload().await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let problems: Vec<String> = match &e {
                ReloadError::Invalid(text) => text.lines().map(str::to_owned).collect(),
                other => vec![other.to_string()],
            };
            let status = match e {
                ReloadError::NoLoader => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            };
            (
                status,
                Json(json!({ "message": e.to_string(), "problems": problems })),
            )
                .into_response()
        }
    }
}

#[derive(Serialize)]
struct HistoryJson {
    time: String,
    delay: u32,
}

/// What the failover groups' health checks last said of `name`, if any
/// group checks it.
fn checked_health(policy: &Policy, name: &str) -> Option<group::CheckedHealth> {
    policy.outbounds().iter().find_map(|n| match &*n.outbound {
        Outbound::Group(g) => g
            .members()
            .iter()
            .position(|m| m.name == name)
            .and_then(|i| g.health(i)),
        _ => None,
    })
}

fn proxy_json(st: &ApiState, policy: &Policy, named: &Named) -> Value {
    let o = &*named.outbound;
    let name = &*named.name;
    let mut history = st.history(name);
    let health = checked_health(policy, name);
    // With no delay test of its own yet, the last health check stands in.
    if let (true, Some(h)) = (history.is_empty(), health) {
        history.push(DelayRecord {
            time: SystemTime::now(),
            delay_ms: h.delay_ms.map_or(0, |d| d.max(1)),
        });
    }
    let alive = match (health, history.last()) {
        (Some(h), _) => h.up,
        (None, Some(last)) => last.delay_ms > 0,
        (None, None) => true,
    };
    let history: Vec<HistoryJson> = history
        .iter()
        .map(|r| HistoryJson {
            time: rfc3339(r.time),
            delay: r.delay_ms,
        })
        .collect();
    let mut v = json!({
        "name": name,
        "type": o.clash_type(),
        "udp": o.udp(),
        "uot": false,
        "xudp": false,
        "tfo": false,
        "mptcp": false,
        "smux": false,
        "alive": alive,
        "history": history,
        "extra": {},
        "interface": "",
        "routing-mark": 0,
        "dialer-proxy": "",
        "provider-name": "",
        "id": named.key.to_string(),
    });
    if let (Outbound::Group(g), Some(map)) = (o, v.as_object_mut()) {
        let all: Vec<&str> = g.members().iter().map(|m| m.name.as_str()).collect();
        map.insert("now".into(), json!(g.selected().name));
        map.insert("all".into(), json!(all));
        map.insert("hidden".into(), json!(false));
        map.insert("icon".into(), json!(""));
        map.insert("testUrl".into(), json!(""));
        map.insert(
            "fixed".into(),
            json!(if g.kind == GroupKind::Selector {
                g.selected().name.as_str()
            } else {
                ""
            }),
        );
    }
    v
}

/// The synthetic `GLOBAL`: every outbound, `now` the final outbound. It
/// only lists; tproxyd has no global mode to select in.
fn global_json(policy: &Policy) -> Value {
    let all: Vec<&str> = policy.outbounds().iter().map(|n| &*n.name).collect();
    let now = policy.rule_target_names().last().unwrap_or("").to_string();
    json!({
        "name": GLOBAL,
        "type": "Selector",
        "udp": true,
        "uot": false,
        "xudp": false,
        "tfo": false,
        "mptcp": false,
        "smux": false,
        "alive": true,
        "history": [],
        "extra": {},
        "interface": "",
        "routing-mark": 0,
        "dialer-proxy": "",
        "provider-name": "",
        "id": "",
        "now": now,
        "all": all,
        "hidden": true,
        "icon": "",
        "testUrl": "",
        "fixed": "",
    })
}

pub async fn proxies(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let policy = st.live.router.policy();
    let mut map: BTreeMap<String, Value> = policy
        .outbounds()
        .iter()
        .map(|n| (n.name.to_string(), proxy_json(&st, &policy, n)))
        .collect();
    map.insert(GLOBAL.into(), global_json(&policy));
    Json(json!({ "proxies": map }))
}

fn find<'a>(policy: &'a Policy, name: &str) -> Option<&'a Named> {
    policy.outbounds().iter().find(|n| &*n.name == name)
}

pub async fn proxy(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let policy = st.live.router.policy();
    if name == GLOBAL {
        return Json(global_json(&policy)).into_response();
    }
    match find(&policy, &name) {
        Some(n) => Json(proxy_json(&st, &policy, n)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Resource not found"),
    }
}

/// `PUT /proxies/{group}` `{"name": member}`: new flows sent to the group
/// go to that member from now on; flows already running stay where they
/// are.
pub async fn select_proxy(
    State(st): State<Arc<ApiState>>,
    Path(group): Path<String>,
    body: Bytes,
) -> Response {
    let Some(member) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
    else {
        return error(StatusCode::BAD_REQUEST, "Body invalid");
    };
    let policy = st.live.router.policy();
    if group == GLOBAL {
        return error(
            StatusCode::BAD_REQUEST,
            "GLOBAL only lists the outbounds: tproxyd routes by its rules (mode rule); select in \
             a selector group instead",
        );
    }
    let Some(named) = find(&policy, &group) else {
        return error(StatusCode::NOT_FOUND, "Resource not found");
    };
    let Outbound::Group(g) = &*named.outbound else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{group:?} is not a group: only a selector group has a choice to make"),
        );
    };
    match g.select(&member) {
        Ok(()) => {
            tracing::info!(group = %group, now = %member, "selector changed from the API");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// mihomo "unfixes" a group's choice; a selector here keeps its choice
/// until the next one, so there is nothing to undo.
pub async fn unfix_proxy(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let policy = st.live.router.policy();
    match find(&policy, &name) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(StatusCode::NOT_FOUND, "Resource not found"),
    }
}

/// How long the delay test may take: `?timeout=` in milliseconds; None
/// when it is not a number.
fn delay_timeout(uri: &Uri) -> Option<Duration> {
    match query_param(uri, "timeout") {
        None => Some(DEFAULT_DELAY_TIMEOUT),
        Some(t) => match t.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms).min(MAX_DELAY_TIMEOUT)),
            _ => None,
        },
    }
}

enum Delay {
    Ms(u32),
    Failed,
    Timeout,
}

/// Times the outbound's own reachability probe (for a proxy: its
/// handshake with the proxy server). The `url` a dashboard names is not
/// fetched: that would send traffic wherever the URL points, and a
/// router's API must not be a way to make it do that.
async fn measure(policy: &Policy, named: &Named, limit: Duration) -> Delay {
    let (index, _) = match policy.outbounds().iter().position(|n| n.key == named.key) {
        Some(i) => policy.resolve(i),
        None => return Delay::Failed,
    };
    let Some(leaf) = policy.outbounds().get(index) else {
        return Delay::Failed;
    };
    let outbound = Arc::clone(&leaf.outbound);
    if matches!(*outbound, Outbound::Block(_)) {
        return Delay::Failed;
    }
    let started = Instant::now();
    match tokio::time::timeout(limit, outbound.probe()).await {
        Err(_) => Delay::Timeout,
        Ok(Err(_)) => Delay::Failed,
        // At least 1: dashboards take 0 for "failed".
        Ok(Ok(())) => Delay::Ms(
            u32::try_from(started.elapsed().as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        ),
    }
}

pub async fn proxy_delay(
    State(st): State<Arc<ApiState>>,
    Path(name): Path<String>,
    uri: Uri,
) -> Response {
    let Some(limit) = delay_timeout(&uri) else {
        return error(StatusCode::BAD_REQUEST, "Body invalid");
    };
    let policy = st.live.router.policy();
    let Some(named) = find(&policy, &name) else {
        return error(StatusCode::NOT_FOUND, "Resource not found");
    };
    match measure(&policy, named, limit).await {
        Delay::Ms(ms) => {
            st.record_delay(&name, ms);
            Json(json!({ "delay": ms })).into_response()
        }
        Delay::Failed => {
            st.record_delay(&name, 0);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "An error occurred in the delay test",
            )
        }
        Delay::Timeout => {
            st.record_delay(&name, 0);
            error(StatusCode::GATEWAY_TIMEOUT, "Timeout")
        }
    }
}

pub async fn groups(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let policy = st.live.router.policy();
    let list: Vec<Value> = policy
        .outbounds()
        .iter()
        .filter(|n| matches!(*n.outbound, Outbound::Group(_)))
        .map(|n| proxy_json(&st, &policy, n))
        .collect();
    Json(json!({ "proxies": list }))
}

pub async fn group(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let policy = st.live.router.policy();
    match find(&policy, &name) {
        Some(n) if matches!(*n.outbound, Outbound::Group(_)) => {
            Json(proxy_json(&st, &policy, n)).into_response()
        }
        _ => error(StatusCode::NOT_FOUND, "Resource not found"),
    }
}

/// Tests every member of a group at once: `{member: delay}` for those
/// that answered.
pub async fn group_delay(
    State(st): State<Arc<ApiState>>,
    Path(name): Path<String>,
    uri: Uri,
) -> Response {
    let Some(limit) = delay_timeout(&uri) else {
        return error(StatusCode::BAD_REQUEST, "Body invalid");
    };
    let policy = st.live.router.policy();
    let Some(Outbound::Group(g)) = find(&policy, &name).map(|n| &*n.outbound) else {
        return error(StatusCode::NOT_FOUND, "Resource not found");
    };
    let members: Vec<&Named> = g
        .members()
        .iter()
        .filter_map(|m| find(&policy, &m.name))
        .collect();
    let results =
        futures_util::future::join_all(members.iter().map(|n| measure(&policy, n, limit))).await;
    let mut out = BTreeMap::new();
    for (n, d) in members.iter().zip(results) {
        match d {
            Delay::Ms(ms) => {
                st.record_delay(&n.name, ms);
                out.insert(n.name.to_string(), ms);
            }
            Delay::Failed | Delay::Timeout => st.record_delay(&n.name, 0),
        }
    }
    Json(json!(out)).into_response()
}

/// No providers: tproxyd's outbounds and rules come from its file.
pub async fn no_providers() -> Json<Value> {
    Json(json!({ "providers": {} }))
}

pub async fn rules(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let policy = st.live.router.policy();
    let hits = st.live.registry.totals().rule_hits;
    let list: Vec<Value> = policy
        .rule_labels()
        .iter()
        .zip(policy.rule_target_names())
        .enumerate()
        .map(|(i, (label, target))| {
            let count = hits.get(&label.index).copied().unwrap_or(0);
            json!({
                "index": i,
                "type": label.kind,
                "payload": label.payload,
                "proxy": target,
                "size": -1,
                // Newer mihomo's field for hit counts; older dashboards
                // ignore it.
                "extra": {
                    "disabled": false,
                    "hitCount": count,
                    "hitAt": "",
                    "missCount": 0,
                    "missAt": "",
                },
            })
        })
        .collect();
    Json(json!({ "rules": list }))
}

/// Closes every flow (both sides reset); 204 as mihomo.
pub async fn close_all(State(st): State<Arc<ApiState>>) -> StatusCode {
    st.live.registry.close_all(EndReason::ClosedByApi);
    StatusCode::NO_CONTENT
}

/// Empties the DNS cache (`DELETE /cache/dns`, mihomo's `POST
/// /cache/dns/flush`).
pub async fn flush_dns_cache(State(st): State<Arc<ApiState>>) -> StatusCode {
    if let Some(dns) = st.live.router.dns() {
        dns.flush_cache();
    }
    StatusCode::NO_CONTENT
}

/// Closes one flow; an unknown id is 204 too, as in mihomo (the flow may
/// have ended between the dashboard's snapshot and the click).
pub async fn close_one(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> StatusCode {
    if let Ok(id) = id.parse::<u64>() {
        st.live.registry.close(id, EndReason::ClosedByApi);
    }
    StatusCode::NO_CONTENT
}

#[derive(Serialize)]
pub struct ConnectionsJson {
    #[serde(rename = "downloadTotal")]
    pub download_total: u64,
    #[serde(rename = "uploadTotal")]
    pub upload_total: u64,
    pub memory: u64,
    pub connections: Vec<ConnectionJson>,
}

#[derive(Serialize)]
pub struct ConnectionJson {
    id: String,
    metadata: Metadata,
    upload: u64,
    download: u64,
    start: String,
    chains: Vec<String>,
    rule: String,
    #[serde(rename = "rulePayload")]
    rule_payload: String,
}

/// Every key mihomo sends, with its zero value where tproxyd knows
/// nothing: dashboards read some without a fallback.
#[derive(Serialize)]
struct Metadata {
    network: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "sourceIP")]
    source_ip: String,
    #[serde(rename = "destinationIP")]
    destination_ip: String,
    #[serde(rename = "sourceGeoIP")]
    source_geoip: Option<()>,
    #[serde(rename = "destinationGeoIP")]
    destination_geoip: Option<()>,
    #[serde(rename = "sourceIPASN")]
    source_ipasn: &'static str,
    #[serde(rename = "destinationIPASN")]
    destination_ipasn: &'static str,
    /// Strings, as mihomo sends them (zashboard compares to '443').
    #[serde(rename = "sourcePort")]
    source_port: String,
    #[serde(rename = "destinationPort")]
    destination_port: String,
    #[serde(rename = "inboundIP")]
    inbound_ip: String,
    #[serde(rename = "inboundPort")]
    inbound_port: String,
    #[serde(rename = "inboundName")]
    inbound_name: &'static str,
    #[serde(rename = "inboundUser")]
    inbound_user: &'static str,
    host: String,
    #[serde(rename = "dnsMode")]
    dns_mode: &'static str,
    uid: u32,
    process: &'static str,
    #[serde(rename = "processPath")]
    process_path: &'static str,
    #[serde(rename = "specialProxy")]
    special_proxy: &'static str,
    #[serde(rename = "specialRules")]
    special_rules: &'static str,
    #[serde(rename = "remoteDestination")]
    remote_destination: String,
    dscp: u8,
    #[serde(rename = "sniffHost")]
    sniff_host: String,
}

/// One flow as a Clash connection.
fn connection_json(f: &Flow, mode: Mode, listen: std::net::SocketAddr) -> ConnectionJson {
    let s = &f.start;
    let (up, down) = f.traffic.get();
    // UDP is always TPROXY; TCP follows the capture mode.
    let tproxy = s.network == Network::Udp || mode == Mode::Tproxy;
    let host = s.host.clone().unwrap_or_default();
    ConnectionJson {
        id: f.id.to_string(),
        metadata: Metadata {
            network: match s.network {
                Network::Tcp => "tcp",
                Network::Udp => "udp",
            },
            kind: if tproxy { "Tproxy" } else { "Redirect" },
            source_ip: s.client.ip().to_string(),
            destination_ip: s.dst.ip().to_string(),
            source_geoip: None,
            destination_geoip: None,
            source_ipasn: "",
            destination_ipasn: "",
            source_port: s.client.port().to_string(),
            destination_port: s.dst.port().to_string(),
            inbound_ip: listen.ip().to_string(),
            inbound_port: listen.port().to_string(),
            inbound_name: if tproxy {
                "DEFAULT-TPROXY"
            } else {
                "DEFAULT-REDIR"
            },
            inbound_user: "",
            sniff_host: if s.sniffed.is_some() {
                host.clone()
            } else {
                String::new()
            },
            host,
            dns_mode: "normal",
            uid: 0,
            process: "",
            process_path: "",
            special_proxy: "",
            special_rules: "",
            remote_destination: s.dst.ip().to_string(),
            dscp: 0,
        },
        upload: up,
        download: down,
        start: rfc3339(f.started_at),
        chains: s.chain.iter().map(|c| c.to_string()).collect(),
        rule: s.rule.kind.to_string(),
        rule_payload: s.rule.payload.clone(),
    }
}

/// The `/connections` snapshot: totals that only grow, and every live
/// flow (an empty list, never null).
pub fn connections_snapshot(st: &ApiState) -> ConnectionsJson {
    let cfg = st.live.config();
    let registry = &st.live.registry;
    let totals = registry.totals();
    let connections = registry
        .snapshot()
        .iter()
        .map(|f| connection_json(f, cfg.mode, cfg.listen))
        .collect();
    ConnectionsJson {
        download_total: totals.down,
        upload_total: totals.up,
        memory: super::streams::rss_bytes(),
        connections,
    }
}

/// A time as RFC 3339 in UTC with nanoseconds, as Go's `time.Time`
/// marshals: `2024-05-01T12:34:56.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic
/// Gregorian calendar (Howard Hinnant's algorithm, in eras of 400 years).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
