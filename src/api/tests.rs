//! The API's handlers through the router (no socket), and the streams
//! through a real listener on 127.0.0.1.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt as _;

use super::*;
use crate::config::{Network, RawConfig};
use crate::live::Live;
use crate::registry::{EndReason, FlowStart, RuleLabel};

const SECRET: &str = "t0ken-for-tests";

/// Outbounds: a direct, a block, a SOCKS5 proxy nobody listens for, a
/// selector and a failover; two rules then final.
fn config_text(secret: Option<&str>, first_rule_outbound: &str) -> String {
    let secret = secret.map_or(String::new(), |s| format!("secret = \"{s}\"\n"));
    format!(
        r#"listen = "[::]:1090"
[[outbounds]]
name = "direct"
type = "direct"

[[outbounds]]
name = "deny"
type = "block"

[[outbounds]]
name = "proxy"
type = "socks5"
server = "127.0.0.1:1"

[[outbounds]]
name = "pick"
type = "selector"
outbounds = ["proxy", "direct"]
default = "direct"

[[outbounds]]
name = "auto"
type = "failover"
outbounds = ["proxy", "direct"]

[route]
final = "pick"

[[route.rules]]
domain_suffix = ["ads.example"]
outbound = "{first_rule_outbound}"

[[route.rules]]
dst = ["198.51.100.0/24"]
dst_port = ["443"]
outbound = "auto"

[firewall]
backend = "none"

[api]
{secret}"#
    )
}

fn load(text: &str) -> Result<crate::config::Config, String> {
    RawConfig::from_toml(text, "t.toml")
        .and_then(|raw| raw.validate(&|_| None))
        .map_err(|e| e.to_string())
}

struct Bed {
    state: Arc<ApiState>,
    live: Arc<Live>,
    /// Kept: dropping it would end every stream at once.
    _stop: watch::Sender<bool>,
    file: std::path::PathBuf,
}

fn bed(secret: Option<&str>) -> Bed {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("tproxyd-api-{}-{n}.toml", std::process::id()));
    let text = config_text(secret, "deny");
    std::fs::write(&file, &text).unwrap();
    let path = file.clone();
    let loader: crate::live::Loader = Box::new(move || {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        load(&text)
    });
    let live = Arc::new(Live::detached(load(&text).unwrap(), Some(loader)).unwrap());
    let (stop, stopped) = watch::channel(false);
    Bed {
        state: ApiState::new(Arc::clone(&live), stopped),
        live,
        _stop: stop,
        file,
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(
    st: &Arc<ApiState>,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => Body::from(v.to_string()),
        None => Body::empty(),
    };
    let resp = router(Arc::clone(st))
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(st: &Arc<ApiState>, uri: &str) -> Answer {
    call(st, Method::GET, uri, Some(SECRET), None).await
}

fn flow(live: &Live, rule: Option<usize>, chain: &[&str]) -> crate::registry::FlowGuard {
    live.registry.open(FlowStart {
        network: Network::Tcp,
        client: "192.0.2.2:40000".parse().unwrap(),
        dst: "198.51.100.10:443".parse().unwrap(),
        host: Some("www.example".into()),
        sniffed: Some(crate::config::SniffProtocol::Tls),
        rule: Arc::new(RuleLabel {
            index: rule,
            kind: "IPCIDR",
            payload: "198.51.100.0/24".into(),
        }),
        chain: chain.iter().map(|c| Arc::from(*c)).collect(),
    })
}

#[tokio::test]
async fn a_secret_is_asked_for_as_a_bearer_token() {
    let b = bed(Some(SECRET));
    let st = &b.state;
    for token in [None, Some("wrong"), Some("t0ken-for-test"), Some("")] {
        let a = call(st, Method::GET, "/version", token, None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(a.json(), json!({"message": "Unauthorized"}));
        // Readable by a dashboard on another origin, so it can say "wrong
        // secret" rather than "unreachable".
        assert_eq!(a.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
    let a = get(st, "/version").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json(),
        json!({"meta": true, "version": format!("tproxyd {}", env!("CARGO_PKG_VERSION"))})
    );
    // The scheme is case-insensitive, as HTTP says.
    let resp = router(Arc::clone(st))
        .oneshot(
            Request::get("/version")
                .header(header::AUTHORIZATION, format!("bearer {SECRET}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // ?token= is for WebSockets only.
    let a = call(
        st,
        Method::GET,
        &format!("/version?token={SECRET}"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // /metrics needs the same token.
    let a = call(st, Method::GET, "/metrics", None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(st, "/metrics").await.status, StatusCode::OK);
    // The dashboard's files and unknown paths need none.
    let a = call(st, Method::GET, "/ui/", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(st, Method::GET, "/no/such/thing", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json(), json!({"message": "Resource not found"}));
}

#[tokio::test]
async fn without_a_secret_everything_is_open() {
    let b = bed(None);
    let a = call(&b.state, Method::GET, "/version", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(&b.state, Method::GET, "/version", Some("anything"), None).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[test]
fn tokens_compare_whole() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abd", b"abc"));
    assert!(!constant_time_eq(b"ab", b"abc"));
    assert!(!constant_time_eq(b"abcabc", b"abc"));
    assert!(!constant_time_eq(b"", b"abc"));
}

#[tokio::test]
async fn a_preflight_is_answered_before_auth() {
    let b = bed(Some(SECRET));
    let resp = router(Arc::clone(&b.state))
        .oneshot(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/proxies/pick")
                .header(header::ORIGIN, "https://dashboard.example")
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "PUT")
                .header(
                    header::ACCESS_CONTROL_REQUEST_HEADERS,
                    "authorization,content-type",
                )
                .header("access-control-request-private-network", "true")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers();
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    let methods = h[header::ACCESS_CONTROL_ALLOW_METHODS].to_str().unwrap();
    for m in ["GET", "PUT", "PATCH", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    assert_eq!(
        h[header::ACCESS_CONTROL_ALLOW_HEADERS],
        "Authorization, Content-Type"
    );
    assert_eq!(h["access-control-allow-private-network"], "true");
}

#[tokio::test]
async fn proxies_list_every_outbound_and_a_global_group() {
    let b = bed(Some(SECRET));
    let a = get(&b.state, "/proxies").await;
    assert_eq!(a.status, StatusCode::OK);
    let p = &a.json()["proxies"];
    assert_eq!(
        p["GLOBAL"]["all"],
        json!(["direct", "deny", "proxy", "pick", "auto"])
    );
    assert_eq!(p["GLOBAL"]["type"], "Selector");
    assert_eq!(p["GLOBAL"]["now"], "pick");
    for (name, kind) in [
        ("direct", "Direct"),
        ("deny", "Reject"),
        ("proxy", "Socks5"),
        ("pick", "Selector"),
        ("auto", "Fallback"),
    ] {
        let e = &p[name];
        assert_eq!(e["name"], name);
        assert_eq!(e["type"], kind, "{name}");
        assert!(e["history"].is_array(), "{name}");
        assert!(e["udp"].is_boolean() && e["alive"].is_boolean(), "{name}");
    }
    assert_eq!(p["pick"]["now"], "direct");
    assert_eq!(p["pick"]["all"], json!(["proxy", "direct"]));
    assert_eq!(p["auto"]["all"], json!(["proxy", "direct"]));
    assert!(p["direct"].get("all").is_none());

    let a = get(&b.state, "/proxies/pick").await;
    assert_eq!(a.json()["now"], "direct");
    assert_eq!(
        get(&b.state, "/proxies/nope").await.status,
        StatusCode::NOT_FOUND
    );
    let g = get(&b.state, "/group").await.json();
    let names: Vec<&str> = g["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pick", "auto"]);
    assert_eq!(
        get(&b.state, "/group/direct").await.status,
        StatusCode::NOT_FOUND
    );
    for path in ["/providers/proxies", "/providers/rules"] {
        let a = get(&b.state, path).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.json(), json!({"providers": {}}));
    }
}

#[tokio::test]
async fn a_selector_is_switched_and_new_flows_follow() {
    let b = bed(Some(SECRET));
    let put = |group: &'static str, body: Value| {
        let st = Arc::clone(&b.state);
        async move {
            call(
                &st,
                Method::PUT,
                &format!("/proxies/{group}"),
                Some(SECRET),
                Some(body),
            )
            .await
        }
    };
    let a = put("pick", json!({"name": "proxy"})).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let policy = b.live.router.policy();
    let meta = crate::policy::FlowMeta::addresses(
        Network::Tcp,
        "192.0.2.2:1".parse().unwrap(),
        "203.0.113.9:80".parse().unwrap(),
    );
    let choice = policy.decide(&meta);
    assert_eq!(
        policy.chain_names(&choice),
        [Arc::from("proxy"), Arc::from("pick")]
    );
    assert_eq!(get(&b.state, "/proxies/pick").await.json()["now"], "proxy");

    for (group, body, status) in [
        ("pick", json!({"name": "deny"}), StatusCode::BAD_REQUEST),
        ("auto", json!({"name": "direct"}), StatusCode::BAD_REQUEST),
        ("direct", json!({"name": "direct"}), StatusCode::BAD_REQUEST),
        ("GLOBAL", json!({"name": "direct"}), StatusCode::BAD_REQUEST),
        ("nope", json!({"name": "direct"}), StatusCode::NOT_FOUND),
        ("pick", json!({"nom": "direct"}), StatusCode::BAD_REQUEST),
    ] {
        let a = put(group, body.clone()).await;
        assert_eq!(a.status, status, "{group} {body}");
        assert!(a.json()["message"].is_string(), "{group} {body}");
    }
    assert_eq!(get(&b.state, "/proxies/pick").await.json()["now"], "proxy");
}

#[tokio::test]
async fn delay_tests_answer_as_mihomo_does() {
    let b = bed(Some(SECRET));
    let a = get(
        &b.state,
        "/proxies/direct/delay?url=http%3A%2F%2Fexample.invalid&timeout=2000",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json()["delay"].as_u64().unwrap() >= 1);
    let a = get(&b.state, "/proxies/deny/delay?timeout=100").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.json()["message"].is_string());
    assert_eq!(
        get(&b.state, "/proxies/nope/delay").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&b.state, "/proxies/direct/delay?timeout=soon")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // The tests are remembered in the history the proxies list shows.
    let p = get(&b.state, "/proxies").await.json();
    let h = p["proxies"]["direct"]["history"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(h.len(), 1);
    assert!(h[0]["delay"].as_u64().unwrap() >= 1 && h[0]["time"].is_string());
    assert_eq!(p["proxies"]["deny"]["history"][0]["delay"], 0);
    assert_eq!(p["proxies"]["deny"]["alive"], false);
    // A group is tested through the member it stands for now; its own
    // test lists the members that answered.
    assert_eq!(
        get(&b.state, "/proxies/pick/delay").await.status,
        StatusCode::OK
    );
    let a = get(&b.state, "/group/pick/delay?timeout=3000").await;
    assert_eq!(a.status, StatusCode::OK);
    let m = a.json();
    assert!(m["direct"].as_u64().unwrap() >= 1, "{m}");
    if nix::unistd::geteuid().is_root() {
        // The SOCKS5 proxy at 127.0.0.1:1 refuses: a failed test.
        assert!(m.get("proxy").is_none(), "{m}");
        let a = get(&b.state, "/proxies/proxy/delay?timeout=3000").await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test]
async fn a_proxy_that_never_answers_times_out_with_504() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: outbound sockets carry SO_MARK, which needs CAP_NET_ADMIN");
        return;
    }
    // A listener that accepts (the kernel does) and never speaks SOCKS5.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let text =
        config_text(Some(SECRET), "deny").replace("127.0.0.1:1", &format!("127.0.0.1:{port}"));
    let live = Arc::new(Live::detached(load(&text).unwrap(), None).unwrap());
    let (_stop, stopped) = watch::channel(false);
    let st = ApiState::new(live, stopped);
    let started = std::time::Instant::now();
    let a = get(&st, "/proxies/proxy/delay?timeout=200").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.json(), json!({"message": "Timeout"}));
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(silent);
}

#[tokio::test]
async fn rules_show_their_outbound_and_hits() {
    let b = bed(Some(SECRET));
    let _a = flow(&b.live, Some(1), &["direct", "auto"]);
    let _b = flow(&b.live, Some(1), &["direct", "auto"]);
    let _c = flow(&b.live, None, &["direct", "pick"]);
    let r = get(&b.state, "/rules").await.json();
    let rules = r["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    assert_eq!(rules[0]["type"], "DomainSuffix");
    assert_eq!(rules[0]["payload"], "ads.example");
    assert_eq!(rules[0]["proxy"], "deny");
    assert_eq!(rules[0]["extra"]["hitCount"], 0);
    assert_eq!(rules[1]["type"], "AND");
    assert_eq!(rules[1]["proxy"], "auto");
    assert_eq!(rules[1]["extra"]["hitCount"], 2);
    assert_eq!(rules[2]["type"], "Match");
    assert_eq!(rules[2]["proxy"], "pick");
    assert_eq!(rules[2]["extra"]["hitCount"], 1);
}

#[tokio::test]
async fn connections_carry_every_field_the_dashboards_read() {
    let b = bed(Some(SECRET));
    let empty = get(&b.state, "/connections").await.json();
    assert_eq!(empty["connections"], json!([]));
    let f = flow(&b.live, Some(1), &["direct", "auto"]);
    f.traffic().add_up(100);
    f.traffic().add_down(2000);
    let id = f.flow().id;
    let s = get(&b.state, "/connections").await.json();
    assert!(s["uploadTotal"].as_u64().unwrap() >= 100, "{s}");
    assert!(s["downloadTotal"].as_u64().unwrap() >= 2000, "{s}");
    let c = &s["connections"][0];
    assert_eq!(c["id"], id.to_string());
    assert_eq!(c["upload"], 100);
    assert_eq!(c["download"], 2000);
    assert_eq!(c["chains"], json!(["direct", "auto"]));
    assert_eq!(c["rule"], "IPCIDR");
    assert_eq!(c["rulePayload"], "198.51.100.0/24");
    let start = c["start"].as_str().unwrap();
    assert!(start.ends_with('Z') && start.len() == 30, "{start}");
    let m = &c["metadata"];
    for (key, value) in [
        ("network", "tcp"),
        ("type", "Tproxy"),
        ("sourceIP", "192.0.2.2"),
        ("sourcePort", "40000"),
        ("destinationIP", "198.51.100.10"),
        ("destinationPort", "443"),
        ("host", "www.example"),
        ("sniffHost", "www.example"),
        ("process", ""),
        ("inboundName", "DEFAULT-TPROXY"),
        ("dnsMode", "normal"),
    ] {
        assert_eq!(m[key], value, "{key}");
    }
    for key in [
        "processPath",
        "remoteDestination",
        "inboundIP",
        "inboundPort",
        "specialProxy",
    ] {
        assert!(m[key].is_string(), "{key}");
    }

    // Closed from the API: the flow's task is told, and ends it.
    let a = call(
        &b.state,
        Method::DELETE,
        &format!("/connections/{id}"),
        Some(SECRET),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(f.flow().is_close_requested());
    let reason = tokio::time::timeout(Duration::from_secs(2), f.flow().close_requested())
        .await
        .unwrap();
    assert_eq!(reason, EndReason::ClosedByApi);
    // Unknown or malformed ids are 204 too, as in mihomo.
    for id in ["999999", "not-a-number"] {
        let a = call(
            &b.state,
            Method::DELETE,
            &format!("/connections/{id}"),
            Some(SECRET),
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::NO_CONTENT);
    }
    let g = flow(&b.live, None, &["direct"]);
    let a = call(&b.state, Method::DELETE, "/connections", Some(SECRET), None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(g.flow().is_close_requested());
}

/// `DELETE /cache/dns` and mihomo's `POST /cache/dns/flush` empty the
/// DNS cache, with the token like every other call.
#[tokio::test]
async fn the_dns_cache_is_flushed_on_both_paths() {
    let b = bed(Some(SECRET));
    let flushes = || {
        b.live
            .router
            .dns()
            .expect("dns")
            .stats
            .cache_flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let a = call(&b.state, Method::DELETE, "/cache/dns", None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(flushes(), 0);
    let a = call(&b.state, Method::DELETE, "/cache/dns", Some(SECRET), None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(flushes(), 1);
    let a = call(
        &b.state,
        Method::POST,
        "/cache/dns/flush",
        Some(SECRET),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(flushes(), 2);
    let a = call(&b.state, Method::GET, "/cache/dns", Some(SECRET), None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn configs_are_read_patched_without_effect_and_reloaded() {
    let b = bed(Some(SECRET));
    let c = get(&b.state, "/configs").await.json();
    assert_eq!(c["mode"], "rule");
    assert_eq!(c["tproxy-port"], 1090);
    assert!(c["log-level"].is_string());
    let a = call(
        &b.state,
        Method::PATCH,
        "/configs",
        Some(SECRET),
        Some(
            json!({"mode": "global", "log-level": "debug", "tun": {"enable": true}, "no-such": 1}),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);

    // A changed rule: the ads rule now goes direct.
    std::fs::write(&b.file, config_text(Some(SECRET), "direct")).unwrap();
    let a = call(
        &b.state,
        Method::PUT,
        "/configs?force=true",
        Some(SECRET),
        Some(json!({"path": "", "payload": ""})),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::NO_CONTENT,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    let rules = get(&b.state, "/rules").await.json();
    assert_eq!(rules["rules"][0]["proxy"], "direct");

    // A broken file: refused, every problem named, the old one runs on.
    std::fs::write(
        &b.file,
        config_text(Some(SECRET), "nowhere").replace("final = \"pick\"", "final = \"gone\""),
    )
    .unwrap();
    let a = call(&b.state, Method::PUT, "/configs", Some(SECRET), None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let e = a.json();
    let problems: Vec<&str> = e["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("route.rules[0].outbound")),
        "{e}"
    );
    assert!(problems.iter().any(|p| p.contains("route.final")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("unchanged"), "{e}");
    let rules = get(&b.state, "/rules").await.json();
    assert_eq!(rules["rules"][0]["proxy"], "direct");

    // A payload is not something tproxyd can apply.
    let a = call(
        &b.state,
        Method::PUT,
        "/configs",
        Some(SECRET),
        Some(json!({"payload": "mode: global"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn endpoints_only_mihomo_has_answer_404_at_once() {
    let b = bed(Some(SECRET));
    for (method, path) in [
        (Method::POST, "/cache/fakeip/flush"),
        (Method::GET, "/dns/query?name=example.com&type=A"),
        (Method::POST, "/upgrade"),
        (Method::POST, "/upgrade/ui"),
        (Method::POST, "/restart"),
        (Method::POST, "/configs/geo"),
        (Method::GET, "/storage/zashboard"),
        (Method::PATCH, "/rules/disable"),
    ] {
        let a = tokio::time::timeout(
            Duration::from_secs(2),
            call(&b.state, method.clone(), path, Some(SECRET), None),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert!(a.json()["message"].is_string());
    }
    let a = call(&b.state, Method::POST, "/version", Some(SECRET), None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a.json()["message"].is_string());
}

#[tokio::test]
async fn metrics_have_the_counters_after_flows() {
    let b = bed(Some(SECRET));
    let f = flow(&b.live, Some(1), &["direct", "auto"]);
    f.traffic().add_up(10);
    f.traffic().add_down(20);
    b.live
        .registry
        .record_connect(&Arc::from("direct"), Duration::from_millis(3));
    f.end(EndReason::Closed, None);
    let a = get(&b.state, "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(a.body).unwrap();
    for line in [
        "tproxyd_build_info{version=\"",
        "tproxyd_flows_opened_total{network=\"tcp\",outbound=\"direct\"} 1",
        "tproxyd_flows_closed_total{network=\"tcp\",outbound=\"direct\",reason=\"closed\"} 1",
        "tproxyd_traffic_bytes_total{direction=\"upload\",outbound=\"direct\"} 10",
        "tproxyd_traffic_bytes_total{direction=\"download\",outbound=\"direct\"} 20",
        "tproxyd_flows_active{network=\"tcp\"} 0",
        "tproxyd_udp_sessions_active 0",
        "tproxyd_udp_reply_sockets 0",
        "tproxyd_rule_hits_total{rule=\"1\",kind=\"AND\"} 1",
        "tproxyd_upstream_connect_duration_seconds_bucket{outbound=\"direct\",le=\"0.005\"} 1",
        "tproxyd_upstream_connect_duration_seconds_count{outbound=\"direct\"} 1",
        "# TYPE tproxyd_upstream_up gauge",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    // No client, destination or host in any label.
    for secret in ["192.0.2.2", "198.51.100.10", "www.example"] {
        assert!(!text.contains(secret), "{secret}");
    }
}

#[tokio::test]
async fn the_dashboard_is_served_with_types_and_validators() {
    let b = bed(Some(SECRET));
    for (path, to) in [("/", "/ui/"), ("/ui", "/ui/")] {
        let a = call(&b.state, Method::GET, path, None, None).await;
        assert!(a.status.is_redirection(), "{path}");
        assert_eq!(a.headers[header::LOCATION], to);
    }
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/index.html", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let a = call(&b.state, Method::GET, path, None, None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(
            a.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        assert_eq!(a.headers[header::CACHE_CONTROL], "no-cache");
        assert!(!a.body.is_empty());
        let tag = a.headers[header::ETAG].clone();
        let resp = router(Arc::clone(&b.state))
            .oneshot(
                Request::get(path)
                    .header(header::IF_NONE_MATCH, tag)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    let a = call(&b.state, Method::GET, "/ui/../Cargo.toml", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

/// A real listener on 127.0.0.1 serving `st`'s router.
async fn listen(st: &Arc<ApiState>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(Arc::clone(st));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Opens a WebSocket and returns its first `n` text messages as JSON.
fn ws_messages(url: String, n: usize) -> Result<Vec<Value>, tungstenite::Error> {
    let (mut socket, _) = tungstenite::connect(url)?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = socket.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let mut out = Vec::new();
    while out.len() < n {
        if let tungstenite::Message::Text(t) = socket.read()? {
            out.push(serde_json::from_str(&t).unwrap());
        }
    }
    let _ = socket.close(None);
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_websocket_take_the_token_in_the_query() {
    let b = bed(Some(SECRET));
    let addr = listen(&b.state).await;
    let _f = flow(&b.live, Some(1), &["direct", "auto"]);
    let url = move |path: &str| format!("ws://{addr}{path}");

    let got = {
        let u = url(&format!("/traffic?token={SECRET}"));
        tokio::task::spawn_blocking(move || ws_messages(u, 2))
            .await
            .unwrap()
            .unwrap()
    };
    for m in &got {
        assert!(m["up"].is_u64() && m["down"].is_u64(), "{m}");
    }
    let got = {
        let u = url(&format!("/memory?token={SECRET}"));
        tokio::task::spawn_blocking(move || ws_messages(u, 2))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(got[0]["inuse"], 0);
    assert!(got[1]["inuse"].as_u64().unwrap() > 0);
    assert_eq!(got[1]["oslimit"], 0);
    let got = {
        let u = url(&format!("/connections?token={SECRET}&interval=100"));
        tokio::task::spawn_blocking(move || ws_messages(u, 2))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        got[0]["connections"][0]["chains"],
        json!(["direct", "auto"])
    );

    // Wrong or missing token: the upgrade is refused with 401.
    for q in ["?token=wrong", "", "?token="] {
        let u = url(&format!("/traffic{q}"));
        let e = tokio::task::spawn_blocking(move || ws_messages(u, 1))
            .await
            .unwrap()
            .unwrap_err();
        match e {
            tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401, "{q}"),
            other => panic!("{q}: {other}"),
        }
    }

    // Logs at the level asked for; an unknown level is accepted.
    for level in ["debug", "no-such-level"] {
        let u = url(&format!("/logs?token={SECRET}&level={level}"));
        let reader = tokio::task::spawn_blocking(move || ws_messages(u, 1));
        // Published until the reader has subscribed and got one.
        let got = loop {
            super::logs::hub().publish(super::logs::LogLevel::Warning, "api test line");
            tokio::time::sleep(Duration::from_millis(50)).await;
            if reader.is_finished() {
                break reader.await.unwrap().unwrap();
            }
        };
        assert_eq!(got[0]["type"], "warning");
        assert!(got[0]["payload"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_websocket_are_json_lines_over_chunked_http() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let b = bed(Some(SECRET));
    let addr = listen(&b.state).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /traffic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Two lines take two ticks (the first comes at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.windows(4).filter(|w| w == b"}\n\r\n").count() < 2 {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("two lines within 5 s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{text}"
    );
    assert!(text.contains("\"down\":"), "{text}");
}
