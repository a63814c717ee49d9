//! The UDP decision stage: what becomes of one datagram, said as a plain
//! value before anything is carried.
//!
//! The relay ([`super::UdpRelay`]) keeps sessions, legs and reply sockets
//! and carries what it is told; everything it is told comes from here:
//!
//! - [`datagram`]: the DNS hooks before and after the route (answered
//!   here, sent to `[dns] server`, carried as DNS over TCP), a session's
//!   QUIC [`Pin`], the rules, the loop check, a fake-ip address (by its
//!   name, or refused when it has none) and an outbound that refuses UDP,
//!   as one [`Verdict`];
//! - [`opening`], [`release_now`], [`sniffed_of`] and [`sniffed_route`]:
//!   the QUIC hold's choices (hold a new flow's first Initial or not,
//!   release it when, route it by which name); `hold.rs` keeps the held
//!   datagrams and their timers.
//!
//! Nothing here touches a socket, a task or the session table: the state
//! a decision reads (the router with its policy and DNS state, a pin, a
//! sniffer's answer, a count) comes in as arguments, so every choice has
//! unit tests without sockets. As on the TCP path (`inbound/tcp.rs` asks
//! `route.rs`, `relay/tcp.rs` carries), deciding allocates nothing of its
//! own: a verdict moves the [`Choice`] the policy made.

use std::net::SocketAddr;

use crate::config::Network;
#[cfg(feature = "quic")]
use crate::config::SniffProtocol;
use crate::dns::{message, Query, PORT};
use crate::outbound::OutboundError;
#[cfg(feature = "quic")]
use crate::policy::sniff::quic::QuicAnswer;
#[cfg(feature = "quic")]
use crate::policy::sniff::Sniffed;
use crate::policy::{Choice, FlowMeta};
use crate::route::{Decision, Router};

#[cfg(feature = "quic")]
use super::hold::{HOLD_BYTES, HOLD_DATAGRAMS, MAX_HOLDS};

/// What the relay does with one datagram.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Send it to `dst` through the session's upstream for `choice`'s
    /// outbound (opening the session or that upstream when needed).
    Forward { dst: SocketAddr, choice: Choice },
    /// A DNS query answered here (a filtered AAAA question): `answer`
    /// goes back to the client from `from`, the address it asked.
    Answer { from: SocketAddr, answer: Vec<u8> },
    /// A DNS query the named resolvers answer (`[[dns.servers]]`); the
    /// answer goes back to the client from `from`, the address it asked.
    /// No route: the resolver picks its server and outbound itself.
    Resolve { from: SocketAddr },
    /// A DNS query `choice`'s outbound carries as DNS over TCP, to `dst`;
    /// the answer goes back to the client from `from`, the address it
    /// asked.
    DnsOverTcp {
        from: SocketAddr,
        dst: SocketAddr,
        choice: Choice,
    },
    /// The chosen outbound refuses UDP by design (`block`, or an `http`
    /// outbound): dropped and counted, no session opened.
    Refuse {
        dst: SocketAddr,
        choice: Choice,
        error: OutboundError,
    },
    /// Addressed to tproxyd's own listener: a routing loop.
    RefuseLoop { dst: SocketAddr },
    /// Addressed to a fake-ip address `fake` that stands for `name`,
    /// routed by that name to `choice`: carried to a real address of the
    /// name (resolved once per session), never to the fake address; the
    /// replies reach the client from `fake`.
    ForwardNamed {
        fake: SocketAddr,
        name: std::sync::Arc<str>,
        choice: Choice,
    },
    /// Addressed to a fake-ip address that stands for no name (the pool
    /// was lost, or recycled the address): dropped and counted, never
    /// sent to the fake address.
    RefuseFake { dst: SocketAddr },
}

/// The route a sniffed QUIC flow keeps: its session's later datagrams to
/// `dst` go where its held ones went, whatever their address says (they
/// carry no name of their own).
#[derive(Debug)]
pub(super) struct Pin {
    pub dst: SocketAddr,
    pub choice: Choice,
}

/// Decides one datagram from `client` to `asked` (its original
/// destination), `payload` its bytes; `pin` is the pin of the client's
/// session, if it has one.
///
/// In order: a query to port 53 may be answered here or go to `[dns]
/// server`; the route is the pin's for its destination, else the rules';
/// a DNS query through an outbound that carries DNS over TCP goes that
/// way (even if it refuses other UDP); an outbound that refuses UDP
/// refuses the rest.
pub(super) fn datagram(
    router: &Router,
    client: SocketAddr,
    asked: SocketAddr,
    payload: &[u8],
    pin: Option<&Pin>,
) -> Verdict {
    let dst = match dns_query(router, client, asked, payload) {
        Query::Forward(to) => to,
        Query::Answer(answer) => {
            return Verdict::Answer {
                from: asked,
                answer,
            }
        }
        Query::Resolve => return Verdict::Resolve { from: asked },
    };
    let choice = match route(router, pin, client, dst) {
        Decision::Forward(choice) => choice,
        Decision::RefuseLoop => return Verdict::RefuseLoop { dst },
        Decision::RefuseFake => return Verdict::RefuseFake { dst },
    };
    // A fake address goes by its name, unless its outbound refuses UDP.
    // DNS over TCP never applies: a query to a fake address's port 53
    // was taken by the hooks above (named resolvers answer every one).
    if let crate::route::FakeDst::Name(name) = fake_name(router, dst) {
        return match carried(dst, choice) {
            Verdict::Forward { dst, choice } => Verdict::ForwardNamed {
                fake: dst,
                name,
                choice,
            },
            refused => refused,
        };
    }
    match carried(dst, choice) {
        Verdict::Forward { dst, choice } if dns_over_tcp(router, dst, &choice, payload) => {
            Verdict::DnsOverTcp {
                from: asked,
                dst,
                choice,
            }
        }
        // An outbound that refuses UDP may still carry DNS over TCP (a
        // shadowsocks server with `udp = false`).
        Verdict::Refuse { dst, choice, .. } if dns_over_tcp(router, dst, &choice, payload) => {
            Verdict::DnsOverTcp {
                from: asked,
                dst,
                choice,
            }
        }
        verdict => verdict,
    }
}

/// The name of a fake-ip destination (no use of it counted: the route
/// decision just did).
fn fake_name(router: &Router, dst: SocketAddr) -> crate::route::FakeDst {
    match router.fake_ip() {
        Some(pool) if pool.is_fake(dst.ip()) => router.fake_dst(dst.ip()),
        _ => crate::route::FakeDst::Real,
    }
}

/// How a datagram routed to `choice` goes: refused when its outbound
/// refuses UDP (a `block` rule holds even for a client whose session
/// another rule opened), else forwarded.
pub(super) fn carried(dst: SocketAddr, choice: Choice) -> Verdict {
    match choice.outbound.udp_refusal() {
        Some(error) => Verdict::Refuse { dst, choice, error },
        None => Verdict::Forward { dst, choice },
    }
}

/// The route of a datagram to `dst`: where the session's pin sends a
/// sniffed flow to `dst`, else the rules by address.
pub(super) fn route(
    router: &Router,
    pin: Option<&Pin>,
    client: SocketAddr,
    dst: SocketAddr,
) -> Decision {
    match pin.filter(|p| p.dst == dst) {
        Some(pin) => Decision::Forward(pin.choice.clone()),
        None => router.decide(&FlowMeta::addresses(Network::Udp, client, dst)),
    }
}

/// Whether a datagram to `dst` is one the DNS hooks look at: port 53,
/// with DNS handling on. A run of them is never sent whole.
pub(super) fn is_dns(router: &Router, dst: SocketAddr) -> bool {
    dst.port() == PORT && router.dns().is_some()
}

/// Before the route: the destination to route a datagram to (the one
/// asked, or `[dns] server` for DNS), or the answer when DNS answers it
/// here.
fn dns_query(router: &Router, client: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Query {
    match router.dns().filter(|_| dst.port() == PORT) {
        Some(dns) => dns.on_query(client, dst, payload),
        None => Query::Forward(dst),
    }
}

/// After the route: whether the chosen outbound carries this datagram as
/// DNS over TCP. Only a DNS query can go that way: anything else sent to
/// port 53 (another protocol, a malformed query) is relayed as the UDP it
/// is, never dropped.
fn dns_over_tcp(router: &Router, dst: SocketAddr, choice: &Choice, payload: &[u8]) -> bool {
    router
        .dns()
        .filter(|_| dst.port() == PORT)
        .is_some_and(|dns| dns.wants_tcp(choice.key, &choice.outbound))
        && is_dns_query(payload)
}

/// A DNS query with its question: what DNS over TCP can carry.
fn is_dns_query(payload: &[u8]) -> bool {
    message::Header::parse(payload).is_ok_and(|h| !h.is_response() && h.qdcount == 1)
        && message::question(payload).is_ok()
}

/// What the QUIC hold does with the first datagram of a client with no
/// session yet, once it looked like an Initial and was given to a new
/// sniffer (`answer`), while `held_flows` are held.
#[cfg(feature = "quic")]
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opening {
    /// Not an Initial that opens: the usual path, by address.
    ByAddress,
    /// The whole ClientHello in one datagram: routed now by what was
    /// found, never held.
    RouteNow(Option<Sniffed>),
    /// The ClientHello goes on in later datagrams: hold the flow.
    Hold,
    /// As many flows are held as may be: by address, at once.
    OverLimit,
}

#[cfg(feature = "quic")]
pub(super) fn opening(answer: QuicAnswer, held_flows: usize) -> Opening {
    match answer {
        QuicAnswer::NotQuic => Opening::ByAddress,
        QuicAnswer::Done(sniffed) => Opening::RouteNow(sniffed),
        QuicAnswer::NeedMore if held_flows >= MAX_HOLDS => Opening::OverLimit,
        QuicAnswer::NeedMore => Opening::Hold,
    }
}

#[cfg(feature = "quic")]
/// Whether a held flow is released now: the sniff ended, or the hold
/// reached its bounds (`datagrams` and payload `bytes` held).
pub(super) fn release_now(answer: &QuicAnswer, datagrams: usize, bytes: usize) -> bool {
    *answer != QuicAnswer::NeedMore || datagrams >= HOLD_DATAGRAMS || bytes >= HOLD_BYTES
}

#[cfg(feature = "quic")]
/// What a released flow is routed as: what the sniff found, or QUIC
/// without a name when it ended before the sniff did (its first Initial
/// opened).
pub(super) fn sniffed_of(answer: QuicAnswer) -> Option<Sniffed> {
    match answer {
        QuicAnswer::Done(s) => s,
        QuicAnswer::NeedMore => Some(Sniffed {
            protocol: SniffProtocol::Quic,
            host: None,
        }),
        QuicAnswer::NotQuic => None,
    }
}

#[cfg(feature = "quic")]
/// The route of a released QUIC flow, decided once with its name and
/// protocol; None for a flow to tproxyd's own listener (the usual path
/// would refuse each of its datagrams).
pub(super) fn sniffed_route(
    router: &Router,
    client: SocketAddr,
    dst: SocketAddr,
    sniffed: Option<&Sniffed>,
) -> Option<Choice> {
    let meta = FlowMeta {
        domain: sniffed.and_then(|s| s.host.as_deref()),
        protocol: sniffed.map(|s| s.protocol),
        ..FlowMeta::addresses(Network::Udp, client, dst)
    };
    match router.decide(&meta) {
        Decision::Forward(choice) => Some(choice),
        Decision::RefuseLoop | Decision::RefuseFake => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::RawConfig;
    use crate::dns::message::build::{query, response, Answer};
    use crate::dns::message::{TYPE_A, TYPE_AAAA};
    use crate::dns::Dns;
    use crate::policy::sniff::quic::{crypto_frame, seal_initial, QuicSniff, Version};
    use crate::policy::sniff::tls::tests::client_hello;
    use crate::policy::Policy;

    const CLIENT: &str = "192.0.2.2:40000";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A router for a configuration: `direct` (`route.final`), `proxy`
    /// (SOCKS5, never dialed here), `web` (HTTP, TCP only), `deny`
    /// (block), `ss` and `ss-tcp` (shadowsocks, the second with
    /// `udp = false`), with `rules` (TOML) and `[dns]` keys `dns`.
    fn router(rules: &str, dns: &str) -> (Router, Option<Arc<Dns>>) {
        let text = format!(
            "listen = \"[::]:1090\"\n\
             [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
             [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
             [[outbounds]]\nname = \"tcp-proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.3:1080\"\ndns_over_tcp = true\n\
             [[outbounds]]\nname = \"web\"\ntype = \"http\"\nserver = \"203.0.113.4:3128\"\n\
             [[outbounds]]\nname = \"deny\"\ntype = \"block\"\n\
             [[outbounds]]\nname = \"ss\"\ntype = \"shadowsocks\"\nserver = \"203.0.113.5:8388\"\n\
             method = \"aes-128-gcm\"\npassword = \"p\"\n\
             [[outbounds]]\nname = \"ss-tcp\"\ntype = \"shadowsocks\"\nserver = \"203.0.113.6:8388\"\n\
             method = \"aes-128-gcm\"\npassword = \"p\"\nudp = false\n\
             [route]\nfinal = \"direct\"\n{rules}\n{dns}\n\
             [firewall]\nbackend = \"none\"\n"
        );
        let cfg = RawConfig::from_toml(&text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let policy = Policy::from_config(&cfg).unwrap();
        if dns.is_empty() {
            return (Router::new(cfg.listen, policy), None);
        }
        let router = Router::new(cfg.listen, policy);
        let dns = Arc::new(Dns::new(&cfg, &router.policy()));
        let router = router.with_dns(Arc::clone(&dns));
        (router, Some(dns))
    }

    fn rule(matches: &str, outbound: &str) -> String {
        format!("[[route.rules]]\n{matches}\noutbound = \"{outbound}\"\n")
    }

    /// The name of the outbound a choice carries through.
    fn name(router: &Router, choice: &Choice) -> String {
        router.policy().name(choice.index).to_string()
    }

    /// A verdict in short: its kind and outbound, for comparisons.
    fn said(router: &Router, v: &Verdict) -> String {
        match v {
            Verdict::Forward { dst, choice } => format!("forward {dst} {}", name(router, choice)),
            Verdict::Answer { from, .. } => format!("answer from {from}"),
            Verdict::Resolve { from } => format!("resolve from {from}"),
            Verdict::DnsOverTcp { from, dst, choice } => {
                format!("dns-over-tcp {dst} {} from {from}", name(router, choice))
            }
            Verdict::Refuse { dst, choice, error } => {
                let kind = match error {
                    OutboundError::Blocked => "blocked",
                    _ => "tcp-only",
                };
                format!("refuse {dst} {} {kind}", name(router, choice))
            }
            Verdict::RefuseLoop { dst } => format!("loop {dst}"),
            Verdict::ForwardNamed {
                fake,
                name: host,
                choice,
            } => format!("by name {fake} {host} {}", name(router, choice)),
            Verdict::RefuseFake { dst } => format!("fake {dst} unmapped"),
        }
    }

    fn decide(router: &Router, dst: &str, payload: &[u8], pin: Option<&Pin>) -> String {
        said(router, &datagram(router, sa(CLIENT), sa(dst), payload, pin))
    }

    #[test]
    fn the_rules_pick_the_outbound_by_destination() {
        let rules = rule("dst = [\"198.51.100.0/24\"]", "proxy")
            + &rule("dst_port = [\"5000-5999\"]\nnetwork = \"udp\"", "deny");
        let (r, _) = router(&rules, "");
        assert_eq!(
            decide(&r, "198.51.100.7:443", b"x", None),
            "forward 198.51.100.7:443 proxy"
        );
        assert_eq!(
            decide(&r, "203.0.113.9:443", b"x", None),
            "forward 203.0.113.9:443 direct"
        );
        assert_eq!(
            decide(&r, "203.0.113.9:5060", b"x", None),
            "refuse 203.0.113.9:5060 deny blocked"
        );
    }

    #[test]
    fn a_datagram_to_the_listener_itself_is_a_loop() {
        let (r, _) = router("", "");
        assert_eq!(
            decide(&r, "127.0.0.1:1090", b"x", None),
            "loop 127.0.0.1:1090"
        );
        // Another port of the same host is an ordinary destination.
        assert_eq!(
            decide(&r, "127.0.0.1:1091", b"x", None),
            "forward 127.0.0.1:1091 direct"
        );
    }

    /// UDP to an outbound that carries TCP only is refused, with the
    /// reason (not blocked); a rule limited to TCP lets UDP go by the
    /// next rule.
    #[test]
    fn a_tcp_only_outbound_refuses_udp_and_tcp_rules_let_it_pass() {
        let (r, _) = router(&rule("dst_port = [\"8080\"]", "web"), "");
        assert_eq!(
            decide(&r, "203.0.113.9:8080", b"x", None),
            "refuse 203.0.113.9:8080 web tcp-only"
        );
        let rules = rule("dst_port = [\"8080\"]\nnetwork = \"tcp\"", "web")
            + &rule("dst_port = [\"8080\"]", "proxy");
        let (r, _) = router(&rules, "");
        assert_eq!(
            decide(&r, "203.0.113.9:8080", b"x", None),
            "forward 203.0.113.9:8080 proxy"
        );
    }

    /// A QUIC flow routed by its name keeps that route for its
    /// destination: later datagrams carry no name. Other destinations of
    /// the same session go by the rules.
    #[test]
    fn a_pinned_quic_flow_follows_its_pin() {
        let (r, _) = router(
            &rule("domain_suffix = [\"via-proxy.example\"]", "proxy"),
            "",
        );
        let dst = sa("198.51.100.7:443");
        let hello = client_hello(Some("www.via-proxy.example"), 0);
        let initial = seal_initial(
            Version::V1,
            &[1; 8],
            b"",
            0,
            1,
            &crypto_frame(0, &hello),
            1200,
        );
        let mut sniff = QuicSniff::new();
        let Opening::RouteNow(sniffed) = opening(sniff.push(&initial), 0) else {
            panic!("a one-datagram ClientHello is routed at once");
        };
        let choice = sniffed_route(&r, sa(CLIENT), dst, sniffed.as_ref()).expect("routed");
        assert_eq!(name(&r, &choice), "proxy");
        let pin = Pin { dst, choice };
        assert_eq!(
            decide(&r, "198.51.100.7:443", b"\x40short header", Some(&pin)),
            "forward 198.51.100.7:443 proxy"
        );
        assert_eq!(
            decide(&r, "198.51.100.7:443", b"\x40short header", None),
            "forward 198.51.100.7:443 direct",
            "by address without the pin"
        );
        assert_eq!(
            decide(&r, "198.51.100.8:443", b"x", Some(&pin)),
            "forward 198.51.100.8:443 direct"
        );
    }

    /// A ClientHello over two Initials: the first is held, the second
    /// completes the name and releases the flow, routed by that name.
    #[test]
    fn an_incomplete_initial_is_held_until_the_name_is_known() {
        let (r, _) = router(
            &rule("domain_suffix = [\"via-proxy.example\"]", "proxy"),
            "",
        );
        let hello = client_hello(Some("www.via-proxy.example"), 1216);
        let seal = |pn, data: &[u8], offset| {
            seal_initial(
                Version::V1,
                &[1; 8],
                b"",
                pn,
                2,
                &crypto_frame(offset, data),
                1250,
            )
        };
        let (d1, d2) = (seal(1, &hello[..1000], 0), seal(2, &hello[1000..], 1000));
        let mut sniff = QuicSniff::new();
        assert_eq!(opening(sniff.push(&d1), 0), Opening::Hold);
        let first = QuicAnswer::NeedMore;
        assert!(!release_now(&first, 1, d1.len()), "held while incomplete");
        let answer = sniff.push(&d2);
        assert!(release_now(&answer, 2, d1.len() + d2.len()));
        let sniffed = sniffed_of(answer);
        let host = sniffed.as_ref().and_then(|s| s.host.as_deref());
        assert_eq!(host, Some("www.via-proxy.example"));
        let choice = sniffed_route(&r, sa(CLIENT), sa("198.51.100.7:443"), sniffed.as_ref());
        assert_eq!(choice.map(|c| name(&r, &c)).as_deref(), Some("proxy"));
        // No new flow is held beyond the bound: it goes by address.
        let mut other = QuicSniff::new();
        assert_eq!(opening(other.push(&d1), MAX_HOLDS), Opening::OverLimit);
        assert_eq!(opening(QuicAnswer::NotQuic, 0), Opening::ByAddress);
    }

    /// A hold ends at its bounds, as nameless QUIC.
    #[test]
    fn a_hold_at_its_bounds_is_released_as_nameless_quic() {
        let waiting = QuicAnswer::NeedMore;
        assert!(release_now(&waiting, HOLD_DATAGRAMS, 10));
        assert!(release_now(&waiting, 1, HOLD_BYTES));
        assert!(!release_now(&waiting, HOLD_DATAGRAMS - 1, HOLD_BYTES - 1));
        let nameless = sniffed_of(QuicAnswer::NeedMore).expect("QUIC");
        assert_eq!(
            (nameless.protocol, nameless.host),
            (SniffProtocol::Quic, None)
        );
        assert_eq!(sniffed_of(QuicAnswer::NotQuic), None);
        // A protocol rule still routes it.
        let (r, _) = router(&rule("protocol = [\"quic\"]", "deny"), "");
        let choice = sniffed_route(
            &r,
            sa(CLIENT),
            sa("198.51.100.7:443"),
            Some(&Sniffed {
                protocol: SniffProtocol::Quic,
                host: None,
            }),
        )
        .expect("routed");
        assert_eq!(name(&r, &choice), "deny");
    }

    /// Port 53 with `[dns] server`: the query goes there, routed as a
    /// datagram to that server (here through a SOCKS5 outbound not yet
    /// known to carry UDP: as DNS over TCP, answered from the address
    /// asked); elsewhere the hooks stay out of the way.
    #[test]
    fn dns_to_port_53_goes_to_the_configured_server() {
        let (r, dns) = router("", "[dns]\nserver = \"198.51.100.53:53\"\n");
        let q = query(7, "example.com", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &q, None),
            "forward 198.51.100.53:53 direct"
        );
        let rules = rule("dst = [\"198.51.100.53/32\"]", "proxy");
        let (via_proxy, _) = router(&rules, "[dns]\nserver = \"198.51.100.53:53\"\n");
        assert_eq!(
            decide(&via_proxy, "192.0.2.1:53", &q, None),
            "dns-over-tcp 198.51.100.53:53 proxy from 192.0.2.1:53"
        );
        let dns = dns.expect("dns on");
        assert_eq!(
            dns.stats
                .hijacked
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            decide(&r, "192.0.2.1:5353", &q, None),
            "forward 192.0.2.1:5353 direct"
        );
        // Without DNS handling, port 53 is a port like others.
        let (plain, _) = router("", "");
        assert_eq!(
            decide(&plain, "192.0.2.1:53", &q, None),
            "forward 192.0.2.1:53 direct"
        );
        assert!(is_dns(&r, sa("192.0.2.1:53")) && !is_dns(&plain, sa("192.0.2.1:53")));
    }

    /// With named resolvers every query to port 53 is answered by them,
    /// from the address asked, whatever the rules say of that address;
    /// what is not a DNS query still goes as the UDP it is.
    #[test]
    fn with_named_resolvers_queries_are_resolved_here() {
        let named = "[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://198.51.100.53\"\n";
        let rules = rule("dst = [\"192.0.2.0/24\"]", "deny");
        let (r, _) = router(&rules, named);
        let q = query(7, "example.com", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &q, None),
            "resolve from 192.0.2.1:53"
        );
        assert_eq!(
            decide(&r, "8.8.8.8:53", &q, None),
            "resolve from 8.8.8.8:53"
        );
        // A response, or no DNS at all, to port 53: routed as UDP.
        let answer = response(&q, &[]);
        assert_eq!(
            decide(&r, "8.8.8.8:53", &answer, None),
            "forward 8.8.8.8:53 direct"
        );
        assert_eq!(
            decide(&r, "8.8.8.8:53", b"junk", None),
            "forward 8.8.8.8:53 direct"
        );
        // Other ports are not DNS.
        assert_eq!(
            decide(&r, "8.8.8.8:5353", &q, None),
            "forward 8.8.8.8:5353 direct"
        );
    }

    /// A filtered AAAA question is answered here, from the address asked.
    #[test]
    fn a_filtered_aaaa_question_is_answered_here() {
        let (r, _) = router("", "[dns]\nfilter_aaaa = true\n");
        let q = query(9, "example.com", TYPE_AAAA);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &q, None),
            "answer from 192.0.2.1:53"
        );
        let a = query(9, "example.com", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &a, None),
            "forward 192.0.2.1:53 direct"
        );
    }

    /// Through an outbound that carries DNS over TCP, a DNS query goes
    /// that way; anything else to port 53 stays UDP, and a refusing
    /// outbound refuses first.
    #[test]
    fn dns_through_a_tcp_only_resolver_path_goes_as_dns_over_tcp() {
        let rules = rule("dst = [\"192.0.2.1/32\"]", "tcp-proxy")
            + &rule("dst = [\"192.0.2.9/32\"]", "deny");
        let (r, _) = router(&rules, "[dns]\nfilter_aaaa = false\n");
        let q = query(7, "example.com", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &q, None),
            "dns-over-tcp 192.0.2.1:53 tcp-proxy from 192.0.2.1:53"
        );
        assert_eq!(
            decide(&r, "192.0.2.1:53", b"not a query", None),
            "forward 192.0.2.1:53 tcp-proxy"
        );
        let answer = response(&q, &[Answer::A(None, "198.51.100.7".parse().unwrap(), 300)]);
        assert_eq!(
            decide(&r, "192.0.2.1:53", &answer, None),
            "forward 192.0.2.1:53 tcp-proxy",
            "an answer is no query"
        );
        assert_eq!(
            decide(&r, "192.0.2.9:53", &q, None),
            "refuse 192.0.2.9:53 deny blocked"
        );
    }

    /// A shadowsocks outbound carries UDP and DNS as UDP; with
    /// `udp = false` it refuses UDP, but DNS through it goes over TCP.
    #[test]
    fn a_shadowsocks_outbound_without_udp_carries_dns_over_tcp() {
        let rules =
            rule("dst = [\"192.0.2.5/32\"]", "ss") + &rule("dst = [\"192.0.2.6/32\"]", "ss-tcp");
        let (r, _) = router(&rules, "[dns]\nfilter_aaaa = false\n");
        let q = query(7, "example.com", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.5:53", &q, None),
            "forward 192.0.2.5:53 ss"
        );
        assert_eq!(
            decide(&r, "192.0.2.5:443", b"x", None),
            "forward 192.0.2.5:443 ss"
        );
        assert_eq!(
            decide(&r, "192.0.2.6:53", &q, None),
            "dns-over-tcp 192.0.2.6:53 ss-tcp from 192.0.2.6:53"
        );
        assert_eq!(
            decide(&r, "192.0.2.6:443", b"x", None),
            "refuse 192.0.2.6:443 ss-tcp tcp-only"
        );
        assert_eq!(
            decide(&r, "192.0.2.6:53", b"not a query", None),
            "refuse 192.0.2.6:53 ss-tcp tcp-only"
        );
    }

    #[test]
    fn only_dns_queries_are_taken_for_dns_over_tcp() {
        assert!(is_dns_query(&message::build::query(7, "example.com", 1)));
        for other in [&b"udp echo me"[..], b"", &[0u8; 12]] {
            assert!(!is_dns_query(other), "{other:?}");
        }
        let query = message::build::query(7, "example.com", 1);
        let answer = message::build::response(&query, &[]);
        assert!(!is_dns_query(&answer), "an answer is no query");
    }

    /// A router with a fake-ip pool over 198.18.0.0/15, with `rules`.
    fn fake_router(rules: &str) -> Router {
        use crate::dns::fakeip::FakePool;
        let dns = "[dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\n\
                   outbound = \"direct\"\n[dns.fake_ip]\nranges = [\"198.18.0.0/15\"]\nstore = \"\"\n";
        let (r, d) = router(rules, dns);
        let cfg_fake = crate::config::FakeIp {
            ranges: vec!["198.18.0.0/15".parse().unwrap()],
            exclude_domain: Vec::new(),
            exclude_domain_suffix: Vec::new(),
            exclude_rule_set: Vec::new(),
            default_exclude: false,
            ttl: 1,
            store: None,
            save_interval: 300,
        };
        let pool = Arc::new(FakePool::new(&cfg_fake));
        d.unwrap().set_fake_ip(Arc::clone(&pool));
        r.with_fake_ip(pool)
    }

    /// UDP to a mapped fake-ip address goes by its name, routed by the
    /// name's rules (the fake address matches no CIDR rule); an unmapped
    /// one is refused; real addresses go as ever.
    #[test]
    fn datagrams_to_fake_addresses_go_by_name() {
        let rules = rule("domain_suffix = [\"via-proxy.example\"]", "proxy")
            + &rule("domain_suffix = [\"via-ss.example\"]", "ss")
            + &rule("dst = [\"198.18.0.0/15\"]", "deny");
        let r = fake_router(&rules);
        // The captured query goes to the engine (which asks the pool).
        let q = query(9, "www.via-proxy.example", TYPE_A);
        assert_eq!(
            decide(&r, "192.0.2.53:53", &q, None),
            "resolve from 192.0.2.53:53"
        );
        let pool = r.fake_ip().unwrap();
        assert!(pool.answer(&q).is_some());
        assert!(pool
            .answer(&query(10, "a.via-ss.example", TYPE_A))
            .is_some());
        assert!(pool.answer(&query(11, "plain.example", TYPE_A)).is_some());
        assert_eq!(
            decide(&r, "198.18.0.1:443", b"x", None),
            "by name 198.18.0.1:443 www.via-proxy.example proxy"
        );
        assert_eq!(
            decide(&r, "198.18.0.2:4500", b"x", None),
            "by name 198.18.0.2:4500 a.via-ss.example ss"
        );
        assert_eq!(
            decide(&r, "198.18.0.3:123", b"x", None),
            "by name 198.18.0.3:123 plain.example direct",
            "route.final, not the rule on the fake range"
        );
        assert_eq!(
            decide(&r, "198.18.0.9:443", b"x", None),
            "fake 198.18.0.9:443 unmapped"
        );
        assert_eq!(
            decide(&r, "203.0.113.9:443", b"x", None),
            "forward 203.0.113.9:443 direct"
        );
    }

    /// A name whose outbound refuses UDP is refused as any flow is, and
    /// a pin (a sniffed QUIC flow) to a fake address still goes by name.
    #[test]
    fn fake_addresses_keep_udp_refusals_and_pins() {
        let rules = rule("domain_suffix = [\"blocked.example\"]", "deny")
            + &rule("domain_suffix = [\"web.example\"]", "web");
        let r = fake_router(&rules);
        let pool = r.fake_ip().unwrap();
        assert!(pool
            .answer(&query(1, "x.blocked.example", TYPE_A))
            .is_some());
        assert!(pool.answer(&query(2, "x.web.example", TYPE_A)).is_some());
        assert!(pool.answer(&query(3, "x.quic.example", TYPE_A)).is_some());
        assert_eq!(
            decide(&r, "198.18.0.1:443", b"x", None),
            "refuse 198.18.0.1:443 deny blocked"
        );
        assert_eq!(
            decide(&r, "198.18.0.2:443", b"x", None),
            "refuse 198.18.0.2:443 web tcp-only"
        );
        let (plain, _) = router(&rule("domain_suffix = [\"x\"]", "proxy"), "");
        let choice = match plain.decide(&FlowMeta::addresses(
            Network::Udp,
            sa(CLIENT),
            sa("203.0.113.1:443"),
        )) {
            Decision::Forward(c) => c,
            other => panic!("{other:?}"),
        };
        let pin = Pin {
            dst: sa("198.18.0.3:443"),
            choice,
        };
        assert_eq!(
            decide(&r, "198.18.0.3:443", b"x", Some(&pin)),
            "by name 198.18.0.3:443 x.quic.example direct"
        );
    }
}
