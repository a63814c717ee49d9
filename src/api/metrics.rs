//! `GET /metrics`: Prometheus text, read from the registry of flows at
//! scrape time.
//!
//! Nothing here runs on the data path: the collector copies the
//! registry's totals (which the relay keeps anyway, and a tick folds into
//! per-outbound sums once a second) when Prometheus asks. Labels are
//! bounded by the configuration (network, outbound, end reason, rule
//! index): never a client, a destination or a host name.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector as PromCollector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::ApiState;
use crate::config::Network;
use crate::live::Live;
use crate::outbound::Outbound;
use crate::registry::CONNECT_BUCKETS;

pub async fn scrape(State(st): State<Arc<ApiState>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, &st.metrics) {
        Ok(()) => {
            let mut resp = text.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                ),
            );
            resp
        }
        Err(_) => super::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        ),
    }
}

fn network(n: Network) -> &'static str {
    match n {
        Network::Tcp => "tcp",
        Network::Udp => "udp",
    }
}

/// Reads the live server at each scrape.
pub struct Collector {
    live: Arc<Live>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

impl Collector {
    pub fn new(live: Arc<Live>) -> Collector {
        Collector { live }
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One counter family: a descriptor, then a sample per label set.
fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PromCollector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = &self.live;
        let totals = live.registry.totals();
        let policy = live.router.policy();

        gauges(
            &mut enc,
            "build_info",
            "tproxyd's version; always 1",
            [(vec![("version", env!("CARGO_PKG_VERSION"))], 1)],
        )?;

        let mut opened: Vec<_> = totals.opened.iter().collect();
        opened.sort_by(|a, b| (network(a.0 .0), &a.0 .1).cmp(&(network(b.0 .0), &b.0 .1)));
        counters(
            &mut enc,
            "flows_opened",
            "TCP flows and UDP sessions given an outbound, by network and outbound",
            None,
            opened
                .iter()
                .map(|((n, o), v)| (vec![("network", network(*n)), ("outbound", &**o)], **v)),
        )?;

        let mut closed: Vec<_> = totals.closed.iter().collect();
        closed.sort_by(|a, b| {
            (network(a.0 .0), &a.0 .1, a.0 .2.as_str()).cmp(&(
                network(b.0 .0),
                &b.0 .1,
                b.0 .2.as_str(),
            ))
        });
        counters(
            &mut enc,
            "flows_closed",
            "TCP flows and UDP sessions that ended, by network, outbound and why",
            None,
            closed.iter().map(|((n, o, r), v)| {
                (
                    vec![
                        ("network", network(*n)),
                        ("outbound", &**o),
                        ("reason", r.as_str()),
                    ],
                    **v,
                )
            }),
        )?;

        let mut bytes: Vec<_> = totals.bytes.iter().collect();
        bytes.sort();
        counters(
            &mut enc,
            "traffic",
            "Bytes relayed, by direction (upload: client to upstream) and outbound",
            Some(&Unit::Bytes),
            bytes.iter().flat_map(|(o, (up, down))| {
                [
                    (vec![("direction", "upload"), ("outbound", &***o)], *up),
                    (vec![("direction", "download"), ("outbound", &***o)], *down),
                ]
            }),
        )?;

        gauges(
            &mut enc,
            "flows_active",
            "TCP flows and UDP sessions open now, by network",
            [Network::Tcp, Network::Udp].map(|n| {
                (
                    vec![("network", network(n))],
                    as_i64(live.registry.count(n)),
                )
            }),
        )?;

        let udp = live.udp();
        gauges(
            &mut enc,
            "udp_sessions_active",
            "UDP sessions (client address and port) open now",
            [(vec![], as_i64(udp.map_or(0, |u| u.session_count())))],
        )?;
        gauges(
            &mut enc,
            "udp_reply_sockets",
            "Transparent sockets open for sending UDP replies from remote addresses",
            [(vec![], as_i64(udp.map_or(0, |u| u.replies.len())))],
        )?;
        if let Some(u) = udp {
            use std::sync::atomic::Ordering::Relaxed;
            let s = &u.stats;
            counters(
                &mut enc,
                "udp_sessions_refused",
                "New UDP sessions refused by the limits, by which limit",
                None,
                [
                    (
                        vec![("limit", "sessions")],
                        s.sessions_refused_full.load(Relaxed),
                    ),
                    (
                        vec![("limit", "sessions_per_client")],
                        s.sessions_refused_client.load(Relaxed),
                    ),
                ],
            )?;
            counters(
                &mut enc,
                "udp_datagrams_dropped",
                "UDP datagrams dropped, by why",
                None,
                [
                    (
                        vec![("reason", "backoff")],
                        s.datagrams_dropped_backoff.load(Relaxed),
                    ),
                    (
                        vec![("reason", "queue-full")],
                        s.datagrams_dropped_queue.load(Relaxed),
                    ),
                    (
                        vec![("reason", "refused")],
                        s.datagrams_refused.load(Relaxed),
                    ),
                    (
                        vec![("reason", "reply-bind")],
                        s.replies_dropped_bind.load(Relaxed),
                    ),
                ],
            )?;
        }

        // Rule index and kind: bounded by the configuration, unlike the
        // payloads (a rule may list thousands of domains).
        let labels = policy.rule_labels();
        let mut hits: Vec<_> = totals.rule_hits.iter().collect();
        hits.sort_by_key(|(i, _)| i.map_or(usize::MAX, |i| i));
        let indices: Vec<(String, &str, u64)> = hits
            .iter()
            .map(|(i, v)| match i {
                Some(i) => (
                    i.to_string(),
                    labels
                        .get(*i)
                        .filter(|l| l.index == Some(*i))
                        .map_or("", |l| l.kind),
                    **v,
                ),
                None => ("final".to_string(), "Match", **v),
            })
            .collect();
        counters(
            &mut enc,
            "rule_hits",
            "Flows each rule decided (rule: its index in route.rules, or final)",
            None,
            indices
                .iter()
                .map(|(i, kind, v)| (vec![("rule", i.as_str()), ("kind", *kind)], *v)),
        )?;

        let mut connects: Vec<_> = totals.connect_times.iter().collect();
        connects.sort_by(|a, b| a.0.cmp(b.0));
        let mut family = enc.encode_descriptor(
            "upstream_connect_duration",
            "Time to connect a TCP flow through its outbound (a proxy: its handshake too)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (outbound, h) in connects {
            let buckets: Vec<(f64, u64)> = CONNECT_BUCKETS
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(h.buckets.iter().copied())
                .collect();
            family
                .encode_family(&vec![("outbound", &**outbound)])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_secs, h.count, &buckets, None,
            )?;
        }

        // Failover members as their group's last health check saw them;
        // absent until the first check.
        let mut up = Vec::new();
        for named in policy.outbounds() {
            if let Outbound::Group(g) = &*named.outbound {
                for (i, m) in g.members().iter().enumerate() {
                    if let Some(h) = g.health(i) {
                        up.push((&*named.name, m.name.as_str(), i64::from(h.up)));
                    }
                }
            }
        }
        gauges(
            &mut enc,
            "upstream_up",
            "Whether a failover group's last health check of a member passed (1) or not (0)",
            up.iter()
                .map(|(g, m, v)| (vec![("group", *g), ("outbound", *m)], *v)),
        )?;
        Ok(())
    }
}
