//! Entry points for the fuzz targets in `fuzz/` (not an API).
//!
//! The parsers of `ip`/`nft`/`ss` output behind `tproxyd doctor` are
//! private to their module; these thin wrappers let the fuzz crate call
//! them without making their types public. Everything else the targets
//! drive (SOCKS5 `proto` and `Socks5Client::handshake`, the config,
//! `Cidr`/`PortRange`, `iptables::removal`, `sys::orig_dst_from_cmsgs`)
//! is public already and is called directly.

use std::net::IpAddr;

use crate::firewall::doctor::{self, Target};
use crate::firewall::iptables::Family;

/// A capture target as plain values: (is IPv4, address named, port).
pub type PlainTarget = (bool, Option<IpAddr>, u16);

fn plain(targets: Vec<Target>) -> Vec<PlainTarget> {
    targets
        .into_iter()
        .map(|t| (t.family == Family::V4, t.addr, t.port))
        .collect()
}

/// The TPROXY/REDIRECT targets doctor reads from `nft list table` output.
pub fn nft_targets(listing: &str) -> Vec<PlainTarget> {
    plain(doctor::nft_targets(listing))
}

/// The TPROXY/REDIRECT targets doctor reads from `iptables-save` output.
pub fn iptables_targets(listing: &str, v4: bool) -> Vec<PlainTarget> {
    let family = if v4 { Family::V4 } else { Family::V6 };
    plain(doctor::iptables_targets(listing, family))
}

/// `:P`, `A:P` or `[A]:P` as doctor splits an nft target.
pub fn split_target(text: &str) -> Option<(Option<IpAddr>, u16)> {
    doctor::split_target(text)
}

/// The local addresses doctor reads from `ss -H` output for `port`, and
/// whether each is reached by a wildcard target of either family.
pub fn ss_local_addrs(out: &str, port: u16) -> Vec<(String, bool, bool)> {
    doctor::ss_local_addrs(out, port)
        .into_iter()
        .map(|a| {
            let one = std::slice::from_ref(&a);
            let reached = |family| {
                doctor::reaches(
                    &Target {
                        family,
                        addr: None,
                        port,
                    },
                    one,
                )
            };
            let (v4, v6) = (reached(Family::V4), reached(Family::V6));
            (a, v4, v6)
        })
        .collect()
}

/// Whether doctor finds a socket bound to `port` in a /proc/net listing.
pub fn proc_net_binds(text: &str, tcp: bool, port: u16) -> bool {
    let proto = if tcp { "tcp" } else { "udp" };
    doctor::proc_net_binds(text, proto, &format!(":{port:04X}"))
}

/// A rule line split into words as iptables-restore splits it (quotes
/// kept together): the reading `iptables::removal` relies on.
pub fn iptables_words(line: &str) -> Vec<String> {
    crate::firewall::iptables::restore_words(line)
}

/// The shadowsocks TCP stream's reply decoder over a reply built from
/// `data` (see `outbound::shadowsocks::tcp::fuzz_reply`).
pub fn ss_tcp_reply(data: &[u8]) {
    crate::outbound::shadowsocks::tcp::fuzz_reply(data);
}

/// A shadowsocks UDP reply through the method `data[0]` picks (of the
/// six), to a client session of a fixed key: `data[1..]` opened as it
/// came (no tag verifies: the checks before the tag), then sealed as an
/// authentic server would (the parsing after the tag). For 2022, unless
/// bit 7 of `data[0]` is set, the sealed body starts with a valid type,
/// time and client session, so the fuzzer reaches padding and address.
/// Panics if a datagram it accepts gives a payload outside the datagram.
pub fn ss_udp_reply(data: &[u8]) {
    use crate::outbound::shadowsocks::crypto::{Key, Method};
    use crate::outbound::shadowsocks::udp::{seal_as_server, Codec};

    const NOW: u64 = 1_765_000_000;
    const CLIENT: u64 = 0x0123_4567_89ab_cdef;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let methods = Method::ALL;
    let method = methods[usize::from(pick) % methods.len()];
    let password = if method.is_2022() {
        if method.key_len() == 16 {
            "AAECAwQFBgcICQoLDA0ODw=="
        } else {
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        }
    } else {
        "fuzz"
    };
    let Ok(key) = Key::new(method, password) else {
        return;
    };
    let codec = Codec::with_session(&key, CLIENT, 0);
    let check = |datagram: &mut Vec<u8>| {
        let len = datagram.len();
        if let Ok((from, payload)) = codec.open(datagram, NOW) {
            assert!(payload.start <= payload.end && payload.end <= len);
            if let crate::outbound::shadowsocks::udp::Source::Name { at, .. } = from {
                assert!(at.start <= at.end && at.end <= payload.start);
            }
        }
    };
    check(&mut rest.to_vec());
    let mut body = Vec::with_capacity(rest.len() + 17);
    if method.is_2022() && pick & 0x80 == 0 {
        body.push(1);
        body.extend_from_slice(&NOW.to_be_bytes());
        body.extend_from_slice(&CLIENT.to_be_bytes());
    }
    body.extend_from_slice(rest);
    // Two server sessions and a few packet ids: the windows and the
    // adoption of a new session are driven too.
    let server = u64::from(pick >> 3 & 1);
    let packet = u64::from(pick >> 4 & 7);
    check(&mut seal_as_server(&key, server, packet, &body));
}
