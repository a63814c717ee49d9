//! The Clash-compatible API of a real tproxyd in the namespace bed, as
//! the dashboards use it: the calls metacubexd, zashboard and yacd make
//! when they start and on their connections page (shared facts, section
//! 1.2 and 1.6), with every field they read checked, against live flows
//! from the LAN.
//!
//! The API listens on the router namespace's loopback; the test reaches
//! it from a thread inside that namespace, so nothing leaves the bed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use common::*;

const SECRET: &str = "api-compat-secret";
const API: &str = "127.0.0.1:9090";
const T: Duration = Duration::from_secs(10);

/// The IPv4 echo goes through the selector (proxy or direct), the IPv6
/// one by rule 1 to `v6_outbound`, the rest direct.
fn config(v6_outbound: &str) -> String {
    format!(
        r#"listen = "[::]:{PROXY_PORT}"
mark = 255

[[outbounds]]
name = "proxy"
type = "socks5"
server = "{SOCKS_V4}:{SOCKS_PORT}"

[[outbounds]]
name = "direct"
type = "direct"

[[outbounds]]
name = "pick"
type = "selector"
outbounds = ["proxy", "direct"]
default = "proxy"

[route]
final = "direct"

[[route.rules]]
dst = ["{REMOTE_A_V4}/32"]
dst_port = ["{ECHO_PORT}"]
outbound = "pick"

[[route.rules]]
dst = ["{REMOTE_A_V6}/128"]
outbound = "{v6_outbound}"

[api]
listen = "{API}"
secret = "{SECRET}"

[firewall]
backend = "none"
"#
    )
}

fn bed() -> Option<Testbed> {
    if !can_run() {
        return None;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.restart_tproxyd_with_config(&config("proxy"));
    let up = wait_until(T, || {
        tb.router
            .enter(|| TcpStream::connect_timeout(&API.parse().unwrap(), T).is_ok())
    });
    assert!(up, "the API did not listen:\n{}", tb.tproxyd_log());
    Some(tb)
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}, not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange with the API, as a browser's fetch would send it
/// (yacd adds Content-Type: application/json to every call).
fn call(
    tb: &Testbed,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let raw = tb.router.enter(|| {
        let mut s =
            TcpStream::connect_timeout(&API.parse().unwrap(), T).expect("connect to the API");
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("the API answers and closes");
        raw
    });
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let len =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + len]);
        data = &data[end + 2 + len + 2..];
    }
    out
}

fn get(tb: &Testbed, path: &str) -> Value {
    let a = call(tb, "GET", path, Some(SECRET), &[], None);
    assert_eq!(
        a.status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

/// A WebSocket to the API, opened from inside the router namespace (the
/// socket stays there whichever thread uses it).
fn ws(tb: &Testbed, path: &str) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
    let stream = tb
        .router
        .enter(|| TcpStream::connect_timeout(&API.parse().unwrap(), T))
        .expect("connect to the API");
    stream.set_read_timeout(Some(T)).unwrap();
    tungstenite::client::client(format!("ws://{API}{path}"), stream)
        .map(|(socket, _)| socket)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => {
                panic!("a blocking handshake was interrupted")
            }
        })
}

fn next_json(socket: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match socket.read().expect("a message within 10 s") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(_) => panic!("the stream closed"),
            _ => {}
        }
    }
}

/// A TCP flow from the LAN held open: its first echo proves it runs.
fn open_echo(tb: &Testbed, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    tb.lan.enter(|| {
        let mut s = TcpStream::connect_timeout(&dst, T).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"hello") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the echo");
            got.extend_from_slice(&buf[..n]);
        }
        let (peer, _) = peer_line(&got);
        (s, peer)
    })
}

fn is_str(v: &Value) -> bool {
    v.is_string()
}

/// What the dashboards read of a connection, without a fallback (1.6).
fn check_connection_fields(c: &Value, proxies: &Value) {
    assert!(is_str(&c["id"]), "{c}");
    assert!(c["upload"].is_u64() && c["download"].is_u64(), "{c}");
    assert!(is_str(&c["start"]), "{c}");
    let chains = c["chains"].as_array().expect("chains is an array");
    assert!(!chains.is_empty(), "{c}");
    // zashboard: proxyMap[head(chains)].type.toLowerCase()
    for name in chains {
        let name = name.as_str().unwrap();
        assert!(is_str(&proxies[name]["type"]), "{name} is not in /proxies");
    }
    assert!(is_str(&c["rule"]) && is_str(&c["rulePayload"]), "{c}");
    let m = &c["metadata"];
    for key in [
        "network",
        "type",
        "sourceIP",
        "sourcePort",
        "destinationIP",
        "destinationPort",
        "host",
        "sniffHost",
        "process",
        "processPath",
        "remoteDestination",
        "inboundIP",
        "inboundPort",
        "inboundName",
        "inboundUser",
        "dnsMode",
        "specialProxy",
        "specialRules",
    ] {
        assert!(is_str(&m[key]), "metadata.{key} is not a string: {c}");
    }
    assert!(m["uid"].is_u64(), "{c}");
}

/// The start-up calls of the three dashboards and their connections
/// page, against a live flow: listed with its rule and chain, closed from
/// the API (the client sees a reset); a selector switch sends new flows
/// elsewhere; the streams give numbers; /metrics counts it all.
#[test]
fn dashboards_see_live_flows_close_them_and_switch_outbounds() {
    let Some(tb) = bed() else {
        return;
    };

    // Preflight (every dashboard sends Authorization, so every call is
    // preceded by one), without auth.
    let a = call(
        &tb,
        "OPTIONS",
        "/proxies",
        None,
        &[
            ("Origin", "http://192.0.2.2:8080"),
            ("Access-Control-Request-Method", "PUT"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
            ("Access-Control-Request-Private-Network", "true"),
        ],
        None,
    );
    assert!(a.status == 204 || a.status == 200, "{}", a.status);
    assert_eq!(a.header("access-control-allow-origin"), Some("*"));
    assert!(a
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("Authorization") && h.contains("Content-Type")));
    assert_eq!(
        a.header("access-control-allow-private-network"),
        Some("true")
    );

    // Endpoint check: 401 without the secret (metacubexd: "auth_error"),
    // the version with it.
    let a = call(&tb, "GET", "/version", None, &[], None);
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["message"], "Unauthorized");
    let a = call(&tb, "GET", "/version", Some("wrong"), &[], None);
    assert_eq!(a.status, 401);
    let v = get(&tb, "/version");
    assert!(
        v["version"].as_str().unwrap().starts_with("tproxyd "),
        "{v}"
    );
    assert_eq!(v["meta"], true);

    // Start: configs, proxies with providers, rules with providers.
    let c = get(&tb, "/configs");
    assert!(is_str(&c["mode"]) && is_str(&c["log-level"]), "{c}");
    assert_eq!(c["tproxy-port"], PROXY_PORT);
    let p = get(&tb, "/proxies");
    assert_eq!(get(&tb, "/providers/proxies"), json!({"providers": {}}));
    assert_eq!(get(&tb, "/providers/rules"), json!({"providers": {}}));
    let proxies = &p["proxies"];
    assert_eq!(proxies["GLOBAL"]["all"], json!(["proxy", "direct", "pick"]));
    for name in ["proxy", "direct", "pick", "GLOBAL"] {
        let e = &proxies[name];
        assert_eq!(e["name"], name);
        assert!(is_str(&e["type"]) && e["history"].is_array(), "{name}: {e}");
        assert!(
            e["udp"].is_boolean() && e["alive"].is_boolean(),
            "{name}: {e}"
        );
    }
    assert_eq!(proxies["pick"]["type"], "Selector");
    assert_eq!(proxies["pick"]["now"], "proxy");
    assert_eq!(proxies["pick"]["all"], json!(["proxy", "direct"]));
    assert_eq!(proxies["proxy"]["type"], "Socks5");
    let r = get(&tb, "/rules");
    let rules = r["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3, "{r}");
    for rule in rules {
        assert!(is_str(&rule["type"]) && is_str(&rule["payload"]) && is_str(&rule["proxy"]));
    }
    assert_eq!(rules[0]["proxy"], "pick");
    assert_eq!(rules[2]["type"], "Match");

    // The streams metacubexd opens at start, token in the query.
    let mut traffic = ws(&tb, &format!("/traffic?token={SECRET}")).expect("traffic stream");
    let mut memory = ws(&tb, &format!("/memory?token={SECRET}")).expect("memory stream");
    let mut conns = ws(&tb, &format!("/connections?token={SECRET}")).expect("connections stream");
    let mut logs = ws(&tb, &format!("/logs?token={SECRET}&level=info")).expect("logs stream");
    match ws(&tb, "/traffic?token=wrong") {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a wrong token opened a stream"),
    }

    // A live flow through the selector (its member: the proxy).
    let dst = Family::V4.remote_a(ECHO_PORT);
    let (mut client, peer) = open_echo(&tb, dst);
    assert_eq!(peer.ip(), Family::V4.hop(Upstream::Socks));
    let wanted = |c: &&Value| {
        c["metadata"]["destinationIP"] == REMOTE_A_V4
            && c["metadata"]["destinationPort"] == json!(ECHO_PORT.to_string())
    };
    let snapshot = get(&tb, "/connections");
    let list = snapshot["connections"].as_array().unwrap();
    let flow = list
        .iter()
        .find(wanted)
        .unwrap_or_else(|| panic!("{snapshot}"));
    check_connection_fields(flow, proxies);
    assert_eq!(flow["chains"], json!(["proxy", "pick"]));
    assert_eq!(flow["rule"], "AND");
    assert!(
        flow["rulePayload"].as_str().unwrap().contains(REMOTE_A_V4),
        "{flow}"
    );
    let m = &flow["metadata"];
    assert_eq!(m["network"], "tcp");
    assert_eq!(m["type"], "Tproxy");
    assert_eq!(m["sourceIP"], LAN_V4);
    assert_eq!(m["sourcePort"], client_port(&client));
    assert!(flow["upload"].as_u64().unwrap() >= 5, "{flow}");
    assert!(snapshot["uploadTotal"].as_u64().unwrap() >= 5, "{snapshot}");

    // The stream shows it too (its first snapshots, queued since it was
    // opened, may predate the flow), and its totals never go down:
    // metacubexd takes a decrease for a restart and wipes its charts.
    let deadline = Instant::now() + T;
    let mut last = (0, 0);
    loop {
        let s = next_json(&mut conns);
        assert!(s["connections"].is_array(), "{s}");
        let now = (
            s["uploadTotal"].as_u64().unwrap(),
            s["downloadTotal"].as_u64().unwrap(),
        );
        assert!(now.0 >= last.0 && now.1 >= last.1, "{last:?} then {s}");
        last = now;
        if s["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| wanted(&c))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flow never showed in the stream"
        );
    }
    for _ in 0..2 {
        let t = next_json(&mut traffic);
        assert!(t["up"].is_u64() && t["down"].is_u64(), "{t}");
        let m = next_json(&mut memory);
        assert!(m["inuse"].is_u64(), "{m}");
    }

    // Close it from the API: the LAN client is reset.
    let id = flow["id"].as_str().unwrap();
    let a = call(
        &tb,
        "DELETE",
        &format!("/connections/{id}"),
        Some(SECRET),
        &[],
        None,
    );
    assert_eq!(a.status, 204);
    let mut buf = [0u8; 64];
    let err = client
        .read(&mut buf)
        .expect_err("the client's connection must be reset, not closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let gone = wait_until(T, || {
        !get(&tb, "/connections")["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id)
    });
    assert!(gone, "the closed flow is still listed");

    // Switch the selector: new flows follow, and the log says so.
    let a = call(
        &tb,
        "PUT",
        "/proxies/pick",
        Some(SECRET),
        &[],
        Some(json!({"name": "direct"})),
    );
    assert_eq!(a.status, 204, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(get(&tb, "/proxies/pick")["now"], "direct");
    assert_eq!(
        tcp_echo(&tb.lan, dst).ip(),
        Family::V4.hop(Upstream::Direct)
    );
    let deadline = Instant::now() + T;
    loop {
        let l = next_json(&mut logs);
        assert!(is_str(&l["type"]) && is_str(&l["payload"]), "{l}");
        if l["payload"].as_str().unwrap().contains("selector changed") {
            break;
        }
        assert!(Instant::now() < deadline, "no log line for the switch");
    }
    let a = call(
        &tb,
        "PUT",
        "/proxies/pick",
        Some(SECRET),
        &[],
        Some(json!({"name": "nowhere"})),
    );
    assert_eq!(a.status, 400);
    assert!(is_str(&a.json()["message"]));

    // Delay test of the proxy (its SOCKS5 handshake with dante).
    let d = get(
        &tb,
        "/proxies/proxy/delay?timeout=5000&url=http%3A%2F%2Fwww.gstatic.com%2Fgenerate_204",
    );
    assert!(d["delay"].as_u64().unwrap() >= 1, "{d}");

    // What zashboard, being told it talks to mihomo, may also call.
    for (method, path) in [
        ("POST", "/cache/fakeip/flush"),
        ("GET", "/dns/query?name=a.example&type=A"),
        ("POST", "/restart"),
        ("POST", "/upgrade"),
    ] {
        let started = Instant::now();
        let a = call(&tb, method, path, Some(SECRET), &[], None);
        assert_eq!(a.status, 404, "{method} {path}");
        assert!(is_str(&a.json()["message"]));
        assert!(started.elapsed() < Duration::from_secs(2), "{path} hung");
    }
    let a = call(
        &tb,
        "PATCH",
        "/configs",
        Some(SECRET),
        &[],
        Some(json!({"mode": "global", "log-level": "debug"})),
    );
    assert_eq!(a.status, 204);

    // yacd's /logs fallback: chunked JSON lines without a WebSocket.
    let lines = tb.router.enter(|| {
        let mut s = TcpStream::connect_timeout(&API.parse().unwrap(), T).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(
            format!(
                "GET /traffic HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {SECRET}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"}\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let _ = s.shutdown(Shutdown::Both);
        String::from_utf8_lossy(&got).into_owned()
    });
    assert!(lines.starts_with("HTTP/1.1 200"), "{lines}");
    assert!(lines.contains("\"up\":"), "{lines}");

    // /metrics: the same token, and the counters of what just happened.
    assert_eq!(call(&tb, "GET", "/metrics", None, &[], None).status, 401);
    let a = call(&tb, "GET", "/metrics", Some(SECRET), &[], None);
    assert_eq!(a.status, 200);
    let text = String::from_utf8(a.body).unwrap();
    for needle in [
        "tproxyd_build_info{version=",
        "tproxyd_flows_opened_total{network=\"tcp\",outbound=\"proxy\"} 1",
        "tproxyd_flows_opened_total{network=\"tcp\",outbound=\"direct\"} 1",
        "tproxyd_flows_closed_total{network=\"tcp\",outbound=\"proxy\",reason=\"closed-by-api\"} 1",
        "tproxyd_flows_closed_total{network=\"tcp\",outbound=\"direct\",reason=\"closed\"} 1",
        "tproxyd_traffic_bytes_total{direction=\"upload\",outbound=\"proxy\"} 5",
        "tproxyd_rule_hits_total{rule=\"0\",kind=\"AND\"} 2",
        "tproxyd_upstream_connect_duration_seconds_count{outbound=\"proxy\"} 1",
        "tproxyd_upstream_connect_duration_seconds_count{outbound=\"direct\"} 1",
        "tproxyd_flows_active{network=\"tcp\"} 0",
        "tproxyd_udp_sessions_active 0",
    ] {
        assert!(text.contains(needle), "{needle}\n{text}");
    }
    assert!(
        !text.contains(LAN_V4) && !text.contains(REMOTE_A_V4),
        "no address labels"
    );
}

fn client_port(s: &TcpStream) -> String {
    s.local_addr().unwrap().port().to_string()
}

/// `PUT /configs` (metacubexd's reload) applies a changed rule to new
/// flows; a broken file is refused with its problem named while the old
/// configuration keeps working.
#[test]
fn put_configs_reloads_and_refuses_a_broken_file() {
    let Some(tb) = bed() else {
        return;
    };
    let v6 = Family::V6.remote_a(ECHO_PORT);
    assert_eq!(tcp_echo(&tb.lan, v6).ip(), Family::V6.hop(Upstream::Socks));

    std::fs::write(tb.config_path(), config("direct")).unwrap();
    let a = call(
        &tb,
        "PUT",
        "/configs?force=true",
        Some(SECRET),
        &[],
        Some(json!({"path": "", "payload": ""})),
    );
    assert_eq!(a.status, 204, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(tcp_echo(&tb.lan, v6).ip(), Family::V6.hop(Upstream::Direct));
    assert_eq!(get(&tb, "/rules")["rules"][1]["proxy"], "direct");

    // zashboard's form of it, on a file with a rule naming no outbound.
    std::fs::write(tb.config_path(), config("nowhere")).unwrap();
    let a = call(&tb, "PUT", "/configs?reload=true", Some(SECRET), &[], None);
    assert_eq!(a.status, 400);
    let e = a.json();
    let problems = e["problems"].as_array().expect("problems listed");
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("route.rules[1].outbound")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("unchanged"), "{e}");
    // The old configuration runs on: the changed rule, and the selector.
    assert_eq!(tcp_echo(&tb.lan, v6).ip(), Family::V6.hop(Upstream::Direct));
    assert_eq!(
        tcp_echo(&tb.lan, Family::V4.remote_a(ECHO_PORT)).ip(),
        Family::V4.hop(Upstream::Socks)
    );
    assert_eq!(get(&tb, "/rules")["rules"][1]["proxy"], "direct");
    assert!(tb.tproxyd_running());
}
