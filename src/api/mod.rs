//! One listener for the Clash-compatible REST API, `/metrics` and the
//! built-in dashboard (`[api]` in the config).
//!
//! The API speaks the subset of mihomo's external controller that the
//! dashboards people already use (metacubexd, zashboard, yacd) call, with
//! the shapes they read; see `clash.rs`. Streams (`/traffic`, `/memory`,
//! `/logs`, `/connections`) are WebSockets, or newline-delimited JSON over
//! chunked HTTP for a plain request; see `streams.rs`.
//!
//! Order of the layers, outermost first: CORS (a browser's preflight
//! carries no token, so it is answered before auth, as mihomo does), then
//! auth on every API route and `/metrics`. The dashboard's own files and
//! the 404 for unknown paths need no token: a browser opens `/ui/` before
//! it knows the secret.

mod clash;
pub mod logs;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "metrics")]
use metrics::scrape;
mod streams;
mod ui;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Secret;
use crate::live::Live;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot serve the API on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Delay tests remembered per outbound, newest last, for `history`.
const HISTORY: usize = 10;

/// One delay test: when, and how long it took (0: it failed, as mihomo
/// reports a failed test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayRecord {
    pub time: SystemTime,
    pub delay_ms: u32,
}

/// What every handler shares.
pub struct ApiState {
    live: Arc<Live>,
    /// outbound name → its last delay tests.
    history: Mutex<HashMap<String, VecDeque<DelayRecord>>>,
    #[cfg(feature = "metrics")]
    metrics: prometheus_client::registry::Registry,
    /// Turns true when the server stops: streams end by themselves then
    /// (their connections outlive the accept loop).
    stop: watch::Receiver<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiState {
    pub fn new(live: Arc<Live>, stop: watch::Receiver<bool>) -> Arc<ApiState> {
        #[cfg(feature = "metrics")]
        let metrics = {
            let mut registry = prometheus_client::registry::Registry::with_prefix("tproxyd");
            registry.register_collector(Box::new(metrics::Collector::new(Arc::clone(&live))));
            registry
        };
        Arc::new(ApiState {
            live,
            history: Mutex::default(),
            #[cfg(feature = "metrics")]
            metrics,
            stop,
        })
    }

    /// The secret of the configuration running now: a reload may change
    /// it without a restart.
    fn secret(&self) -> Option<Secret> {
        self.live
            .config()
            .api
            .as_ref()
            .and_then(|a| a.secret.clone())
    }

    fn record_delay(&self, name: &str, delay_ms: u32) {
        let mut history = lock(&self.history);
        let h = history.entry(name.to_string()).or_default();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(DelayRecord {
            time: SystemTime::now(),
            delay_ms,
        });
    }

    fn history(&self, name: &str) -> Vec<DelayRecord> {
        lock(&self.history)
            .get(name)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// The whole API as one router (the tests drive it without a socket).
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/version", get(clash::version))
        .route(
            "/configs",
            get(clash::get_configs)
                .patch(clash::patch_configs)
                .put(clash::put_configs),
        )
        .route("/proxies", get(clash::proxies))
        .route(
            "/proxies/{name}",
            get(clash::proxy)
                .put(clash::select_proxy)
                .delete(clash::unfix_proxy),
        )
        .route("/proxies/{name}/delay", get(clash::proxy_delay))
        .route("/group", get(clash::groups))
        .route("/group/{name}", get(clash::group))
        .route("/group/{name}/delay", get(clash::group_delay))
        .route("/providers/proxies", get(clash::no_providers))
        .route("/providers/rules", get(clash::no_providers))
        .route("/rules", get(clash::rules))
        .route(
            "/connections",
            get(streams::connections).delete(clash::close_all),
        )
        .route("/connections/{id}", delete(clash::close_one))
        .route("/cache/dns", delete(clash::flush_dns_cache))
        // mihomo's path, which metacubexd and zashboard call.
        .route("/cache/dns/flush", post(clash::flush_dns_cache))
        .route("/traffic", get(streams::traffic))
        .route("/memory", get(streams::memory))
        .route("/logs", get(streams::logs))
        .route("/metrics", get(scrape))
        // route_layer: only matched routes ask for the token, so an
        // unknown path is a quick 404 whatever it carries.
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), auth));
    Router::new()
        .route("/", get(ui::to_ui))
        .route("/ui", get(ui::to_ui))
        .route("/ui/", get(ui::index))
        .route("/ui/{*file}", get(ui::file))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(cors))
        .with_state(state)
}

/// `/metrics` in a build without the `metrics` feature: a scraper (or
/// whoever set it up) learns why, instead of a bare 404.
#[cfg(not(feature = "metrics"))]
async fn scrape() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this tproxyd was built without the `metrics` feature: /metrics is not served \
         (a full build has it: cargo build --release, default features)",
    )
}

/// Serves the API on `listener` until `stop` turns true.
pub async fn serve(
    listener: std::net::TcpListener,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
) -> Result<(), ApiError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let serve_error = |source| ApiError::Serve { addr, source };
    listener.set_nonblocking(true).map_err(serve_error)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(serve_error)?;
    let state = ApiState::new(live, stop.clone());
    let auth = if state.secret().is_some() {
        "Bearer token required"
    } else {
        "no secret: loopback only"
    };
    info!(%addr, auth, "API, /metrics and the dashboard (/ui/) listening");
    let mut until = stop;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = until.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(|source| {
            warn!(%addr, "the API stopped: {source}");
            ApiError::Serve { addr, source }
        })
}

/// A JSON error as mihomo writes them: `{"message": ...}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "message": message.into() })),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Resource not found")
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
}

/// Preflights are answered here, before auth (they carry no token); every
/// other answer gets `Access-Control-Allow-Origin` so a dashboard on
/// another origin can read it, a 401 included (that is how it tells a
/// wrong secret from an unreachable host).
async fn cors(req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
        // Chromium's private network access: a public page may reach a
        // router's private address only if the router says so.
        h.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("300"),
        );
        return resp;
    }
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// `Authorization: Bearer SECRET`, or `?token=SECRET` on a WebSocket
/// upgrade (a browser cannot set headers on one). No secret: no auth.
async fn auth(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let Some(secret) = state.secret() else {
        return next.run(req).await;
    };
    if authorized(&req, secret.expose()) {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "Unauthorized")
    }
}

fn authorized(req: &Request, secret: &str) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade {
        if let Some(token) = query_param(req.uri(), "token") {
            if !token.is_empty() {
                return constant_time_eq(token.as_bytes(), secret.as_bytes());
            }
        }
    }
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            constant_time_eq(token.trim().as_bytes(), secret.as_bytes())
        }
        _ => false,
    }
}

/// One query parameter, percent-decoded; None when absent or undecodable.
pub(crate) fn query_param(uri: &axum::http::Uri, key: &str) -> Option<String> {
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri).ok()?;
    pairs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Compares without stopping at the first difference, so the time taken
/// tells nothing about how much of a guess was right. The length may
/// show; the secret's content does not.
fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, &b) in given.iter().enumerate() {
        // Over the guess's whole length, against the secret cycled (an
        // empty secret never reaches here: it means no auth).
        let s = secret.get(i % secret.len().max(1)).copied().unwrap_or(0);
        diff |= b ^ s;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests;
