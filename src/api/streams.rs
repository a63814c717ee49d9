//! The streams: `/traffic`, `/memory`, `/logs` and `/connections`.
//!
//! A WebSocket when the request asks for one (what metacubexd and
//! zashboard open, with `?token=`); otherwise newline-delimited JSON over
//! chunked HTTP (yacd's fallback for `/logs`), except `/connections`,
//! whose plain GET is one snapshot. Every stream ends when the client
//! goes or the server stops.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use super::logs::{self, LogLevel};
use super::{clash, query_param, ApiState};

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

/// Produces the next message of a periodic stream; None: nothing this
/// time.
type Produce = Box<dyn FnMut(&ApiState) -> Option<String> + Send>;

/// The process's resident memory in bytes (`VmRSS`), as mihomo reports
/// `inuse`; 0 when it cannot be read.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Resolves when the server stops (or is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard wait_for returns is dropped here: held across an await
    // it would make the stream's future not Send.
    let _ = stop.wait_for(|s| *s).await;
}

/// A stream of `produce`'s messages every `every`, the first at once.
fn periodic(st: Arc<ApiState>, ws: Upgrade, every: Duration, produce: Produce) -> Response {
    match ws {
        Ok(ws) => ws.on_upgrade(move |socket| periodic_ws(socket, st, every, produce)),
        Err(_) => chunked(stream::unfold(
            (st, tick(every), produce),
            |(st, mut tick, mut produce)| async move {
                let mut stop = st.stop.clone();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped(&mut stop) => return None,
                    }
                    if let Some(line) = produce(&st) {
                        return Some((line, (st, tick, produce)));
                    }
                }
            },
        )),
    }
}

fn tick(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    // A slow client must not get a burst of catch-up messages.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

async fn periodic_ws(
    mut socket: WebSocket,
    st: Arc<ApiState>,
    every: Duration,
    mut produce: Produce,
) {
    let mut tick = tick(every);
    let mut stop = st.stop.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(text) = produce(&st) {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
            // Reading answers pings and notices the client's close.
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = stopped(&mut stop) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Lines of JSON over chunked HTTP, one per message.
fn chunked<S>(lines: S) -> Response
where
    S: futures_util::Stream<Item = String> + Send + 'static,
{
    use futures_util::StreamExt as _;
    let body = Body::from_stream(lines.map(|mut line| {
        line.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    }));
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `{"up","down"}` in bytes per second, once a second (the registry's
/// rate, measured by the server's tick), with the totals newer mihomo
/// sends too.
pub async fn traffic(State(st): State<Arc<ApiState>>, ws: Upgrade) -> Response {
    periodic(
        st,
        ws,
        Duration::from_secs(1),
        Box::new(|st: &ApiState| {
            let r = st.live.registry.rate();
            Some(
                serde_json::json!({
                    "up": r.up,
                    "down": r.down,
                    "upTotal": r.up_total,
                    "downTotal": r.down_total,
                })
                .to_string(),
            )
        }),
    )
}

/// `{"inuse","oslimit"}` once a second. The first is 0, as in mihomo,
/// so a chart begins from zero.
pub async fn memory(State(st): State<Arc<ApiState>>, ws: Upgrade) -> Response {
    let mut first = true;
    periodic(
        st,
        ws,
        Duration::from_secs(1),
        Box::new(move |_: &ApiState| {
            let inuse = if std::mem::take(&mut first) {
                0
            } else {
                rss_bytes()
            };
            Some(serde_json::json!({ "inuse": inuse, "oslimit": 0 }).to_string())
        }),
    )
}

/// A snapshot (plain GET), or one every `?interval=` ms (default 1000)
/// over a WebSocket.
pub async fn connections(State(st): State<Arc<ApiState>>, ws: Upgrade, uri: Uri) -> Response {
    match ws {
        Err(_) => Json(clash::connections_snapshot(&st)).into_response(),
        ok => {
            let every = query_param(&uri, "interval")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(1), |ms| {
                    // Bounded: a snapshot lists every flow, and a client
                    // asking for one each millisecond would cost the most.
                    Duration::from_millis(ms.clamp(100, 60_000))
                });
            periodic(
                st,
                ok,
                every,
                Box::new(|st: &ApiState| {
                    serde_json::to_string(&clash::connections_snapshot(st)).ok()
                }),
            )
        }
    }
}

/// The log lines tproxyd writes, from now on, at `?level=` and above.
/// Any level is accepted (an unknown one means info): zashboard's
/// WebSocket reconnects forever on a 400.
pub async fn logs(State(st): State<Arc<ApiState>>, ws: Upgrade, uri: Uri) -> Response {
    let level = LogLevel::parse(query_param(&uri, "level").as_deref().unwrap_or("info"));
    let rx = logs::hub().subscribe();
    match ws {
        Ok(ws) => ws.on_upgrade(move |socket| logs_ws(socket, st, rx, level)),
        Err(_) => chunked(stream::unfold((st, rx), move |(st, mut rx)| async move {
            let mut stop = st.stop.clone();
            loop {
                let line = tokio::select! {
                    line = rx.recv() => line,
                    _ = stopped(&mut stop) => return None,
                };
                match line {
                    Ok(l) => {
                        if let Some(text) = l.json_at(level) {
                            return Some((text, (st, rx)));
                        }
                    }
                    // A slow reader lost some lines; it goes on with the
                    // next rather than ending.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })),
    }
}

async fn logs_ws(
    mut socket: WebSocket,
    st: Arc<ApiState>,
    mut rx: broadcast::Receiver<logs::LogLine>,
    level: Option<LogLevel>,
) {
    let mut stop = st.stop.clone();
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Ok(l) => {
                    if let Some(text) = l.json_at(level) {
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = stopped(&mut stop) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}
