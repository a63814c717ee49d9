//! Named resolvers end to end in the namespaces, as a LAN client sees
//! them (issue 21): tproxyd answers captured port 53 (UDP and TCP, asked
//! of an address where no resolver listens) from its `[[dns.servers]]`.
//!
//! - `kdig` over TCP and over UDP get the same answer;
//! - DoT and DoH servers (unbound in the WAN namespace, with a throwaway
//!   CA that tproxyd trusts through `SSL_CERT_FILE`; the `dns-tls`
//!   feature) answer from unbound's local zone; `kdig +tls` checks that
//!   DoT server with the same CA and name first (tproxyd serves no DoT
//!   itself, so kdig's DoT goes to the bed's server);
//! - the cache: 100 identical queries at once reach the upstream once, a
//!   second ask is answered with a lower TTL and no upstream query, a
//!   0x20 mixed-case name hits the cache and gets its own case back, an
//!   NXDOMAIN with an SOA is cached; and the API's `DELETE /cache/dns`
//!   empties it.
//!
//! The upstream is the tests' own DNS server (tests/common/dns_server.rs),
//! which records every question it gets, so a test counts what reached it.

mod common;

use std::net::{IpAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::dns_server::{query, DnsServer};
use common::*;

/// The upstream resolver (in the WAN namespace, reached directly).
const RESOLVER: &str = "198.51.100.53";
/// Captured, but nothing listens there: only tproxyd can answer.
const ASKED: &str = "198.51.100.1";
/// What the upstream answers for every A question.
const ANSWER: &str = "198.51.100.77";

fn zone(_name: &str, qtype: u16) -> Option<IpAddr> {
    match qtype {
        1 => ANSWER.parse().ok(),
        _ => None,
    }
}

/// Whether the tools run; a missing one fails under CI.
fn tools(names: &[&str]) -> bool {
    for tool in names {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = format!("{tool} is missing (scripts/setup-test-deps installs it)");
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping: {why}");
            return false;
        }
    }
    true
}

fn bed() -> Testbed {
    Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    })
}

/// A whole config: direct routing, the bed's own capture rules, and
/// `dns` (the `[dns]` section and its servers) and `extra` after it.
fn config(dns: &str, extra: &str) -> String {
    format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"direct\"\n\
         {dns}\n{extra}\n\
         [firewall]\nbackend = \"none\"\n"
    )
}

/// The tests' DNS server on [`RESOLVER`] as the only named resolver.
fn plain_resolver(tb: &mut Testbed, extra: &str) -> DnsServer {
    tb.wan.ip(&format!("addr add {RESOLVER}/32 dev lo"));
    let server = DnsServer::start(&tb.wan, &[addr(RESOLVER, DNS_PORT)], zone);
    tb.restart_tproxyd_with_config(&config(
        &format!(
            "[dns]\nfinal = \"up\"\n\
             [[dns.servers]]\nname = \"up\"\naddress = \"udp://{RESOLVER}\"\noutbound = \"direct\"\n"
        ),
        extra,
    ));
    server
}

/// How many questions for `name` reached the server.
fn asked(server: &DnsServer, name: &str) -> usize {
    server
        .asked()
        .iter()
        .filter(|a| a.name.eq_ignore_ascii_case(name))
        .count()
}

/// `PROGRAM ARGS` in the LAN namespace; its whole output.
fn in_lan(tb: &Testbed, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lan.name, program])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dig(tb: &Testbed, name: &str) -> String {
    in_lan(
        tb,
        "dig",
        &["+time=5", "+tries=1", &format!("@{ASKED}"), name, "A"],
    )
}

/// The A records of a dig or kdig answer: (owner name, TTL, address).
fn records(out: &str) -> Vec<(String, u32, String)> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [name, ttl, "IN", "A", addr] => {
                    Some((name.to_string(), ttl.parse().ok()?, addr.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

fn addresses(out: &str) -> Vec<String> {
    records(out).into_iter().map(|(_, _, a)| a).collect()
}

#[test]
fn kdig_over_tcp_and_udp_gets_the_same_answer_from_the_named_resolver() {
    if !can_run() || !tools(&["kdig"]) {
        return;
    }
    let mut tb = bed();
    let server = plain_resolver(&mut tb, "");
    let kdig = |transport: &str| {
        let out = in_lan(
            &tb,
            "kdig",
            &[
                transport,
                "+time=5",
                "+retry=0",
                &format!("@{ASKED}"),
                "kdig.example",
                "A",
            ],
        );
        assert!(
            out.contains("status: NOERROR"),
            "{transport}: {out}\n{}",
            tb.tproxyd_log()
        );
        out
    };
    let tcp = kdig("+tcp");
    assert!(tcp.contains(&format!(";; From {ASKED}@53(TCP)")), "{tcp}");
    let udp = kdig("+notcp");
    assert!(udp.contains(&format!(";; From {ASKED}@53(UDP)")), "{udp}");
    assert_eq!(addresses(&tcp), [ANSWER], "{tcp}");
    assert_eq!(addresses(&udp), addresses(&tcp), "{udp}");
    // The resolver answered it (nothing listens on ASKED): tproxyd asked
    // it, and only once (the UDP ask came from the cache).
    assert_eq!(asked(&server, "kdig.example"), 1, "{:?}", server.asked());
}

#[test]
fn the_cache_coalesces_counts_down_keeps_case_and_negative_answers_and_is_flushed_by_the_api() {
    if !can_run() || !tools(&["dig", "curl"]) {
        return;
    }
    let mut tb = bed();
    let server = plain_resolver(&mut tb, "[api]\nlisten = \"127.0.0.1:9090\"\n");

    // 100 identical queries at once from one client: one upstream query,
    // 100 answers, each with its own id.
    let sock = tb.lan.enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = addr(ASKED, DNS_PORT);
    for id in 1..=100u16 {
        sock.send_to(&query(id, "burst.example", 1), target)
            .unwrap();
    }
    let want: Vec<u8> = ANSWER
        .parse::<std::net::Ipv4Addr>()
        .unwrap()
        .octets()
        .to_vec();
    let mut ids = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1500];
    while ids.len() < 100 && Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        let reply = &buf[..n];
        assert!(n > 12 && reply[3] & 0xf == 0, "not NOERROR: {reply:?}");
        assert!(
            reply.windows(4).any(|w| w == want.as_slice()),
            "no {ANSWER} in {reply:?}"
        );
        ids.insert(u16::from_be_bytes([reply[0], reply[1]]));
    }
    assert_eq!(
        ids.len(),
        100,
        "answered ids: {ids:?}\n{}",
        tb.tproxyd_log()
    );
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&100));
    assert_eq!(asked(&server, "burst.example"), 1, "{:?}", server.asked());

    // Asked again within the TTL: from the cache, the TTL counted down.
    let first = records(&dig(&tb, "ttl.example"));
    assert_eq!(first.len(), 1, "{first:?}");
    std::thread::sleep(Duration::from_millis(2100));
    let out = dig(&tb, "ttl.example");
    let again = records(&out);
    assert_eq!(again.len(), 1, "{out}");
    assert_eq!(again[0].2, ANSWER);
    assert!(
        again[0].1 < first[0].1,
        "TTL {} then {}",
        first[0].1,
        again[0].1
    );
    assert_eq!(asked(&server, "ttl.example"), 1);

    // 0x20: the same name in mixed case hits the cache, and the answer
    // carries the client's case.
    let out = dig(&tb, "TtL.eXaMpLe");
    let mixed = records(&out);
    assert_eq!(mixed.len(), 1, "{out}");
    assert_eq!(mixed[0].0, "TtL.eXaMpLe.", "{out}");
    assert!(out.contains(";TtL.eXaMpLe.\t"), "question echoed: {out}");
    assert_eq!(asked(&server, "ttl.example"), 1, "{:?}", server.asked());

    // NXDOMAIN with an SOA: cached too.
    for _ in 0..2 {
        let out = dig(&tb, "gone.nx.test");
        assert!(out.contains("status: NXDOMAIN"), "{out}");
        assert!(out.contains("SOA"), "the SOA is passed on: {out}");
    }
    assert_eq!(asked(&server, "gone.nx.test"), 1, "{:?}", server.asked());

    // DELETE /cache/dns empties the cache: the next ask reaches the
    // upstream again.
    let code = tb.router.exec_output(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "DELETE",
        "http://127.0.0.1:9090/cache/dns",
    ]);
    assert!(code.starts_with('2'), "DELETE /cache/dns: {code}");
    assert_eq!(addresses(&dig(&tb, "ttl.example")), [ANSWER]);
    assert_eq!(asked(&server, "ttl.example"), 2, "{:?}", server.asked());
    assert!(dig(&tb, "gone.nx.test").contains("status: NXDOMAIN"));
    assert_eq!(asked(&server, "gone.nx.test"), 2);
}

/// DoT and DoH: unbound in the WAN namespace, its certificate for
/// `dns.test` signed by a CA of the test's own, which tproxyd trusts
/// through `SSL_CERT_FILE`.
#[cfg(feature = "dns-tls")]
#[test]
fn dot_and_doh_servers_answer_from_unbound_through_the_resolver() {
    use tproxyd::testbed::unbound::Unbound;
    /// Where unbound serves DoT (853) and DoH (443).
    const UNBOUND: &str = "198.51.100.55";
    if !can_run() || !tools(&["dig", "ss", "kdig"]) {
        return;
    }
    let mut tb = bed();
    tb.wan.ip(&format!("addr add {UNBOUND}/32 dev lo"));
    let Some(ub) = Unbound::start_in(&tb.wan.name, UNBOUND.parse().unwrap(), 853, 443) else {
        return;
    };
    let bundle = tb.dir.join("test-ca.pem");
    std::fs::write(&bundle, &ub.pki.ca).unwrap();
    // The bed's DoT server is real DoT with the trust tproxyd is given:
    // kdig verifies it with that CA and name, and fails without the CA.
    let kdig_tls = |ca: &str| {
        tb.wan.exec_output(&[
            "kdig",
            "+tls",
            ca,
            "+tls-hostname=dns.test",
            "+time=3",
            "+retry=0",
            &format!("@{UNBOUND}"),
            "-p",
            "853",
            "a.test",
            "A",
        ])
    };
    let out = kdig_tls(&format!("+tls-ca={}", bundle.display()));
    assert!(
        out.contains("NOERROR") && out.contains("TLS") && addresses(&out) == ["192.0.2.1"],
        "kdig +tls: {out}\nunbound:\n{}",
        ub.log()
    );
    let out = kdig_tls("+tls-ca");
    assert!(
        !out.contains("NOERROR"),
        "kdig trusted the test CA without being given it: {out}"
    );
    tb.set_tproxyd_env("SSL_CERT_FILE", &bundle.display().to_string());
    tb.restart_tproxyd_with_config(&config(
        &format!(
            "[dns]\nfinal = \"doh\"\n\
             [[dns.servers]]\nname = \"dot\"\naddress = \"tls://{UNBOUND}:853\"\n\
             server_name = \"dns.test\"\noutbound = \"direct\"\n\
             [[dns.servers]]\nname = \"doh\"\naddress = \"https://{UNBOUND}:443/dns-query\"\n\
             server_name = \"dns.test\"\noutbound = \"direct\"\n\
             [[dns.rules]]\ndomain = [\"a.test\"]\nserver = \"dot\"\n"
        ),
        "",
    ));
    let established = |port: u16| {
        tb.wan
            .exec_output(&[
                "ss",
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .lines()
            .count()
    };

    // a.test by the rule, over DoT.
    let out = dig(&tb, "a.test");
    assert!(
        out.contains("status: NOERROR"),
        "{out}\n{}\nunbound:\n{}",
        tb.tproxyd_log(),
        ub.log()
    );
    assert_eq!(addresses(&out), ["192.0.2.1"], "{out}");
    assert!(established(853) >= 1, "a DoT connection");

    // The rest by `final`, over DoH.
    let out = dig(&tb, "n7.test");
    assert!(
        out.contains("status: NOERROR"),
        "{out}\n{}",
        tb.tproxyd_log()
    );
    assert_eq!(addresses(&out), ["198.51.100.7"], "{out}");
    assert!(established(443) >= 1, "a DoH connection");
    // A name outside unbound's zone: its NXDOMAIN, passed on.
    assert!(dig(&tb, "elsewhere.example").contains("status: NXDOMAIN"));
}

/// `/etc/netns/NAME`, which `ip netns exec NAME` mounts over /etc's
/// files, removed on drop.
struct NetnsEtc(std::path::PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A router whose resolv.conf names tproxyd's own `dns.listen`: a
/// `system` server would send each query back to tproxyd, where it waits
/// for itself (5 s, then SERVFAIL). `check`, and so the start, refuse it.
#[test]
fn a_system_server_naming_the_own_listener_is_refused() {
    if !can_run() {
        return;
    }
    let tb = bed();
    let etc = NetnsEtc(std::path::PathBuf::from("/etc/netns").join(&tb.router.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(etc.0.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    let file = tb.dir.join("system-loop.toml");
    let check = |listen: &str| {
        std::fs::write(
            &file,
            config(
                &format!(
                    "[dns]\nlisten = [\"{listen}\"]\nfinal = \"sys\"\n\
                     [[dns.servers]]\nname = \"sys\"\naddress = \"system\"\n"
                ),
                "",
            ),
        )
        .unwrap();
        let out = tb.tproxyd_cli(&["check", "--config", &file.display().to_string()]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = check("127.0.0.1:53");
    assert!(!ok, "{text}");
    assert!(
        text.contains("dns.servers[0].address")
            && text.contains("127.0.0.1:53, tproxyd's own dns.listen")
            && text.contains("/etc/resolv.conf"),
        "{text}"
    );
    // Another port: no loop, accepted.
    let (ok, text) = check("127.0.0.1:5353");
    assert!(ok, "{text}");
}
