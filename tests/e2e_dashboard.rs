//! The built-in dashboard in a real browser: headless Chromium, driven
//! over WebDriver by chromedriver, loads `/ui/` from a tproxyd running in
//! the namespace bed, is asked for the API secret, shows a live TCP flow
//! from the LAN with its rule and outbound, and closes it with the row's
//! button: the LAN client's connection is reset, the row goes away, and
//! a second flow is left alone.
//!
//! chromedriver (and so Chromium, its child) runs inside the router
//! namespace, where the API listens on loopback: the browser reaches
//! nothing but that namespace. The test talks to chromedriver and to the
//! API over sockets it opens from a thread inside the same namespace.
//!
//! With `TPROXYD_SCREENSHOT=path` the test saves a PNG of the page with
//! the flows on it (docs/dashboard.png comes from here);
//! without it nothing is written, so a CI run leaves the tree clean.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

const SECRET: &str = "e2e-dashboard-secret";
const API: &str = "127.0.0.1:9090";
const DRIVER_PORT: u16 = 9515;
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C id of a found element, as the key of its JSON object.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The flow the test closes goes through the selector (chain
/// `proxy`, `select`); the one it keeps goes by `final` (direct).
fn config() -> String {
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
name = "select"
type = "selector"
outbounds = ["proxy", "direct"]
default = "proxy"

[route]
final = "direct"

[[route.rules]]
dst = ["{REMOTE_A_V4}/32"]
dst_port = ["{ECHO_PORT}"]
outbound = "select"

[api]
listen = "{API}"
secret = "{SECRET}"

[firewall]
backend = "none"
"#
    )
}

/// Beyond the bed's needs: the browser and its driver. Under CI a missing
/// piece fails the test.
fn browser_available() -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        let why = format!(
            "the dashboard test needs {CHROMIUM} and {CHROMEDRIVER} \
             (Debian packages chromium, chromium-driver; scripts/setup-test-deps installs them)"
        );
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("skipping: {why}");
    }
    ok
}

// ---- a minimal HTTP/1.1 client, connecting from inside a namespace -------

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn http(
    ns: &Netns,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> std::io::Result<Response> {
    // The socket belongs to the namespace of the thread that made it.
    let mut s = ns.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?;
    // Creating a session starts Chromium: on two busy cores that can take
    // a while.
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())?;
    // chromedriver keeps the connection open whatever the request says:
    // the body ends where Content-Length (or the last chunk) says.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let split = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the end of headers"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body = raw[split + 4..].to_vec();
    loop {
        let done = match length {
            Some(len) => body.len() >= len,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    if let Some(len) = length {
        body.truncate(len);
    } else if chunked {
        body = dechunk(&body);
    }
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

// ---- WebDriver ----------------------------------------------------------

struct Browser<'a> {
    ns: &'a Netns,
    driver: Child,
    session: Option<String>,
}

impl<'a> Browser<'a> {
    fn start(ns: &'a Netns, dir: &Path) -> Browser<'a> {
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns.name, CHROMEDRIVER])
            .arg(format!("--port={DRIVER_PORT}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            ns,
            driver,
            session: None,
        };
        let up = wait_until(Duration::from_secs(20), || {
            b.call("GET", "/status", None)
                .is_ok_and(|v| v["value"]["ready"] == json!(true))
        });
        assert!(up, "chromedriver did not become ready");
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let args = [
            "--headless",
            // Root, in a namespace: Chromium's sandbox needs user namespaces
            // of its own, which are not there for root.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            // No traffic of its own (updates, safe browsing, sync): the
            // browser only ever talks to tproxyd.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1100",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = b
            .call("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("new session: {e}\n{}", b.driver_log(dir)));
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}\n{}", b.driver_log(dir)))
            .to_string();
        b.session = Some(id);
        b
    }

    fn driver_log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join("chromedriver.log")).unwrap_or_default()
    }

    /// One WebDriver command; a WebDriver error is an Err with its message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let to: SocketAddr = ([127, 0, 0, 1], DRIVER_PORT).into();
        // POST without a body must still send "{}" (the spec's empty body).
        let empty = json!({});
        let body = body.or((method == "POST").then_some(&empty));
        let r = http(self.ns, to, method, path, &[], body).map_err(|e| e.to_string())?;
        let v = r.json();
        if r.status >= 400 || v["value"]["error"].is_string() {
            return Err(format!(
                "{method} {path}: {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v)
    }

    fn session(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let id = self.session.as_deref().expect("no session");
        self.call(method, &format!("/session/{id}{path}"), body)
    }

    fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(&json!({ "url": url })))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Elements matching a CSS selector, now.
    fn find_all(&self, css: &str) -> Vec<String> {
        let v = self
            .session(
                "POST",
                "/elements",
                Some(&json!({"using": "css selector", "value": css})),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for an element matching `css`; panics with the page's
    /// console after `within`.
    fn wait_for(&self, css: &str, within: Duration) -> String {
        let mut found = None;
        wait_until(within, || {
            found = self.find_all(css).into_iter().next();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no element {css} within {within:?}; browser console:\n{}",
                self.console()
            )
        })
    }

    /// Waits until the first element matching `css` shows `needle`.
    fn wait_for_text(&self, css: &str, needle: &str) {
        let element = self.wait_for(css, Duration::from_secs(10));
        let mut last = String::new();
        let found = wait_until(Duration::from_secs(10), || {
            last = self.text(&element);
            last.contains(needle)
        });
        assert!(found, "{css} does not show {needle:?}; it shows:\n{last}");
    }

    fn child(&self, element: &str, css: &str) -> String {
        let v = self
            .session(
                "POST",
                &format!("/element/{element}/element"),
                Some(&json!({"using": "css selector", "value": css})),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"][ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no {css} in element: {v}"))
            .to_string()
    }

    fn text(&self, element: &str) -> String {
        let v = self
            .session("GET", &format!("/element/{element}/text"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"].as_str().unwrap_or_default().to_string()
    }

    fn attribute(&self, element: &str, name: &str) -> Option<String> {
        let v = self
            .session("GET", &format!("/element/{element}/attribute/{name}"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"].as_str().map(String::from)
    }

    fn click(&self, element: &str) {
        self.session("POST", &format!("/element/{element}/click"), None)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn type_into(&self, element: &str, text: &str) {
        self.session(
            "POST",
            &format!("/element/{element}/value"),
            Some(&json!({ "text": text })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The page's console messages (chromedriver's log endpoint).
    fn console(&self) -> String {
        match self.session("POST", "/se/log", Some(&json!({"type": "browser"}))) {
            Ok(v) => v["value"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| format!("{} {}", e["level"], e["message"]))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default(),
            Err(e) => format!("(no console: {e})"),
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = self
            .session("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("{e}"));
        let png = base64_decode(v["value"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        png
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        // Ends Chromium; the bed kills whatever else is left in the
        // namespace when it goes.
        if self.session.is_some() {
            let _ = self.session("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---- a long-lived LAN client ------------------------------------------------

/// A TCP client in the LAN namespace that keeps talking to the WAN echo
/// server (so neither side's idle timers end it) until it is stopped or
/// its connection fails; the failure is sent back.
struct LongClient {
    stop: Arc<AtomicBool>,
    ended: mpsc::Receiver<std::io::Error>,
    local: SocketAddr,
}

impl LongClient {
    fn start(lan: &Netns, dst: SocketAddr) -> LongClient {
        let mut s = lan
            .enter(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let local = s.local_addr().unwrap();
        // The server's greeting: the flow is up end to end.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, ended) = mpsc::channel();
        let flag = Arc::clone(&stop);
        thread::spawn(move || {
            // Some kilobytes a second each way: enough for the chart.
            let chunk = pattern(8 * 1024, local.port().into());
            let mut back = vec![0u8; chunk.len()];
            while !flag.load(Ordering::Relaxed) {
                let r = s.write_all(&chunk).and_then(|()| s.read_exact(&mut back));
                if let Err(e) = r {
                    let _ = tx.send(e);
                    return;
                }
                thread::sleep(Duration::from_millis(250));
            }
        });
        LongClient { stop, ended, local }
    }

    /// The error that ended the connection so far, if any.
    fn failed(&self) -> Option<std::io::Error> {
        self.ended.try_recv().ok()
    }
}

impl Drop for LongClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The flow's id as the API lists it, found by the client's port.
fn api_flow_id(tb: &Testbed, client: SocketAddr) -> Option<String> {
    let auth = format!("Bearer {SECRET}");
    let r = http(
        &tb.router,
        API.parse().unwrap(),
        "GET",
        "/connections",
        &[("Authorization", &auth)],
        None,
    )
    .ok()?;
    let v = r.json();
    v["connections"].as_array()?.iter().find_map(|c| {
        (c["metadata"]["sourcePort"] == json!(client.port().to_string()))
            .then(|| c["id"].as_str().map(String::from))
            .flatten()
    })
}

#[test]
fn the_dashboard_shows_a_live_flow_and_its_close_button_resets_it() {
    if !can_run() || !browser_available() {
        return;
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    tb.restart_tproxyd_with_config(&config());
    let api: SocketAddr = API.parse().unwrap();
    let listening = wait_until(Duration::from_secs(10), || {
        tb.router
            .enter(|| TcpStream::connect_timeout(&api, Duration::from_secs(1)))
            .is_ok()
    });
    assert!(
        listening,
        "the API does not listen on {API}:\n{}",
        tb.tproxyd_log()
    );

    // The flow to close, through the selector, and one to keep (final).
    let closed = LongClient::start(&tb.lan, Family::V4.remote_a(ECHO_PORT));
    let kept = LongClient::start(&tb.lan, Family::V6.remote_a(ECHO_PORT));
    let closed_dst = format!("{REMOTE_A_V4}:{ECHO_PORT}");
    let kept_dst = format!("[{REMOTE_A_V6}]:{ECHO_PORT}");

    let browser = Browser::start(&tb.router, &tb.dir);
    browser.goto(&format!("http://{API}/ui/"));

    // tproxyd has a secret: the page's first call gets 401 and it asks.
    let input = browser.wait_for("#secret", Duration::from_secs(20));
    browser.type_into(&input, SECRET);
    browser.click(&browser.wait_for("#auth-submit", Duration::from_secs(5)));

    let row_css = format!("#flow-rows tr[data-dst=\"{closed_dst}\"]");
    let row = browser.wait_for(&row_css, Duration::from_secs(20));
    let cell = |css: &str| browser.text(&browser.child(&row, css));
    let rule = cell("td[data-col=\"rule\"]");
    assert!(
        rule.contains(&format!("{REMOTE_A_V4}/32")),
        "rule column: {rule:?}"
    );
    let chain = cell("td[data-col=\"chain\"]");
    assert!(
        chain.contains("select") && chain.contains("proxy"),
        "outbound column: {chain:?}"
    );
    assert_eq!(
        browser.attribute(&row, "data-outbound").as_deref(),
        Some("proxy"),
        "chains[0] is the outbound that carries the flow"
    );
    let src = cell("td[data-col=\"src\"]");
    assert_eq!(src, closed.local.to_string(), "source column");
    // The row is the flow the API lists for this client.
    let id = api_flow_id(&tb, closed.local).expect("the API lists the flow");
    assert_eq!(
        browser.attribute(&row, "data-flow-id").as_deref(),
        Some(id.as_str())
    );
    browser.wait_for(
        &format!("#flow-rows tr[data-dst=\"{kept_dst}\"]"),
        Duration::from_secs(10),
    );
    // The outbounds and rules views are filled from the API too.
    browser.wait_for("#groups select#group-select", Duration::from_secs(10));
    browser.wait_for("#rule-rows tr", Duration::from_secs(10));

    // The log tail, at debug (tproxyd runs with --verbose): a short flow
    // that ends is logged, and the page shows the line.
    browser.click(&browser.wait_for("#log-level option[value=\"debug\"]", Duration::from_secs(5)));
    let short = tcp_echo(&tb.lan, Family::V6.remote_a(ECHO_PORT));
    assert_eq!(
        short.ip(),
        Family::V6.hop(Upstream::Direct),
        "final is direct"
    );
    browser.wait_for_text("#log-lines", &format!("dst={kept_dst} outbound=direct"));

    if let Some(path) = std::env::var_os("TPROXYD_SCREENSHOT") {
        // Some seconds of traffic on the chart first.
        thread::sleep(Duration::from_secs(8));
        std::fs::write(&path, browser.screenshot()).unwrap();
        eprintln!("screenshot saved to {}", Path::new(&path).display());
    }

    assert!(closed.failed().is_none(), "the flow ended before the click");
    let clicked = Instant::now();
    browser.click(&browser.child(&row, "button[data-action=\"close\"]"));

    let err = closed
        .ended
        .recv_timeout(Duration::from_secs(10))
        .expect("the client's connection was not closed within 10 s of the click");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionReset,
        "the client must see a reset, got {err}"
    );
    eprintln!("reset {:?} after the click", clicked.elapsed());

    browser.wait_for_text("#log-lines", "closed-by-api");
    let gone = wait_until(Duration::from_secs(10), || {
        browser.find_all(&row_css).is_empty()
    });
    assert!(gone, "the closed flow's row is still shown");
    assert!(
        !browser
            .find_all(&format!("#flow-rows tr[data-dst=\"{kept_dst}\"]"))
            .is_empty(),
        "the other flow's row went too"
    );
    if let Some(e) = kept.failed() {
        panic!("the other flow was closed too: {e}");
    }
    // The first call's 401 is logged by Chromium itself; anything else
    // severe is the page's own error.
    let console = browser.console();
    let errors: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("SEVERE") && !l.contains("401"))
        .collect();
    assert!(errors.is_empty(), "the page logged errors:\n{console}");
}
