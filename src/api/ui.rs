//! The built-in dashboard's files, embedded in the binary: a router with
//! no internet (or a dashboard the browser would refuse as mixed content)
//! still has one at `/ui/`.
//!
//! No token is needed for these: the page asks for the secret and sends
//! it with its API calls.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Name, content type and bytes of each file in `assets/ui/`. A file
/// added there needs a line here.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/ui/style.css"),
    ),
];

pub async fn to_ui() -> Redirect {
    Redirect::permanent("/ui/")
}

pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

pub async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve(&name, &headers)
}

/// FNV-1a of the file: its ETag, so a browser revalidates cheaply.
fn etag(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(&(_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return super::error(StatusCode::NOT_FOUND, "Resource not found");
    };
    let tag = etag(bytes);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        bytes.into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The names carry no version, and a new binary brings new files:
    // always revalidate (the ETag makes that a 304 when nothing changed).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}
