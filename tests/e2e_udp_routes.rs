//! UDP sessions routed per destination (issue 9): one LAN client port
//! talks to a remote the rules send through the SOCKS5 proxy and to one
//! they send direct, alternately. The session holds one upstream per
//! outbound, each server sees the hop its outbound implies, and every
//! answer reaches the client from the remote's own address (full cone
//! through both upstreams).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;

/// `proxy` (dante) is `route.final`; REMOTE_B goes direct.
fn config() -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"
mode = \"tproxy\"

[[outbounds]]
name = \"proxy\"
type = \"socks5\"
server = \"{SOCKS_V4}:{SOCKS_PORT}\"

[[outbounds]]
name = \"direct\"
type = \"direct\"

[route]
final = \"proxy\"

[[route.rules]]
dst = [\"{REMOTE_B_V4}/32\", \"{REMOTE_B_V6}/128\"]
outbound = \"direct\"

[firewall]
lan_interfaces = [\"rlan\"]
"
    )
}

/// Sends `payload` to `dst`; returns (reply source, hop the server saw).
fn exchange(s: &UdpSocket, dst: SocketAddr, payload: &[u8]) -> (SocketAddr, SocketAddr) {
    s.send_to(payload, dst).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {dst} to {payload:?}: {e}"));
    let (peer, off) = peer_line(&buf[..n]);
    assert_eq!(&buf[off..n], payload, "answer from {dst} changed");
    (from, peer)
}

#[test]
fn one_client_port_uses_the_proxy_and_direct_at_once_full_cone() {
    if !can_run() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: Some(OwnRules {
            top: String::new(),
            firewall: "lan_interfaces = [\"rlan\"]".into(),
        }),
    });
    tb.restart_tproxyd_with_config(&config());

    let mut sockets = Vec::new();
    for fam in [Family::V4, Family::V6] {
        let (a, b) = (fam.remote_a(UDP_ECHO_PORT), fam.remote_b(UDP_ECHO_PORT));
        let s = tb.lan.enter(|| {
            let s = UdpSocket::bind(fam.lan_any()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for round in 0..4 {
                let (from, peer) = exchange(&s, a, format!("to A {round}").as_bytes());
                assert_eq!(from, a, "{fam:?} round {round}: A's answer from elsewhere");
                assert_eq!(
                    peer.ip(),
                    fam.hop(Upstream::Socks),
                    "{fam:?} round {round}: A must be reached through dante"
                );
                let (from, peer) = exchange(&s, b, format!("to B {round}").as_bytes());
                assert_eq!(from, b, "{fam:?} round {round}: B's answer from elsewhere");
                assert_eq!(
                    peer.ip(),
                    fam.hop(Upstream::Direct),
                    "{fam:?} round {round}: B must be reached directly"
                );
            }
            // Full cone through the proxy while B also has a direct
            // upstream: A has B answer, and that answer (arriving through
            // dante) still comes from B's address.
            let (from, peer) = exchange(&s, a, b"CONE answer from B");
            assert_eq!(from, b, "{fam:?}: cone reply must carry B's address");
            assert_eq!(peer.ip(), fam.hop(Upstream::Socks), "{fam:?}");
            s
        });
        sockets.push(s);
    }
    // One association per client port, the direct upstreams beside them.
    assert_eq!(tb.socks_control_connections(), 2, "{}", tb.tproxyd_log());
    let log = tb.tproxyd_log();
    assert_eq!(
        log.matches("session adds an upstream").count(),
        2,
        "one extra upstream per client port:\n{log}"
    );
    drop(sockets);
}
