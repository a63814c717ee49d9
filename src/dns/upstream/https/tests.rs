//! DNS over HTTPS against unbound on loopback (the harness is DoT's:
//! `super::super::tls::tests`).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::dns::message::{build, Header, TYPE_A};
use crate::dns::upstream::tls::tests::{address, direct, dropping_server, expected, Pki, Unbound};

fn doh(ub: &Unbound, name: &str, path: &str) -> HttpsUpstream {
    HttpsUpstream::new(
        ub.doh,
        name.to_string(),
        path.to_string(),
        ub.pki.client_config(),
    )
}

#[tokio::test]
async fn an_answer_over_https_with_the_clients_id() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    for name in ["dns.test", ""] {
        let up = doh(&ub, name, "/dns-query");
        let q = build::query(0xbeef, "a.test", TYPE_A);
        let a = up.exchange(&q, 1, &direct()).await.unwrap();
        assert_eq!(Header::parse(&a).unwrap().id, 0xbeef);
        assert_eq!(address(&a), expected("a.test"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_are_streams_on_one_connection() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let out = direct();
    let up = Arc::new(doh(&ub, "dns.test", "/dns-query"));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (up, out) = (Arc::clone(&up), Arc::clone(&out));
        tasks.push(tokio::spawn(async move {
            let name = format!("n{i}.test");
            let a = up.exchange(&build::query(i, &name, TYPE_A), 1, &out).await;
            (i, name, a)
        }));
    }
    for t in tasks {
        let (i, name, a) = t.await.unwrap();
        let a = a.unwrap();
        assert_eq!(Header::parse(&a).unwrap().id, i);
        assert_eq!(address(&a), expected(&name), "{name}");
    }
    assert_eq!(up.connections_opened(), 1);
    assert_eq!(Unbound::connections_to(ub.doh.port()), 1);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_with_the_fix() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let up = doh(&ub, "wrong.example", "/dns-query");
    let q = build::query(1, "a.test", TYPE_A);
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err().to_string();
    assert!(e.contains("\"wrong.example\""), "{e}");
    assert!(e.contains("set server_name"), "says the fix: {e}");
}

#[tokio::test]
async fn a_wrong_path_is_an_http_error_named() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let up = doh(&ub, "dns.test", "/nothing-here");
    let q = build::query(1, "a.test", TYPE_A);
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err();
    assert!(matches!(e, TlsError::BadResponse { .. }), "{e:?}");
    assert!(e.to_string().contains("HTTP status"), "{e}");
}

#[tokio::test]
async fn a_connection_the_server_closed_is_opened_again() {
    let Some(ub) = Unbound::start(300) else {
        return;
    };
    let out = direct();
    let up = doh(&ub, "dns.test", "/dns-query");
    let q = build::query(5, "a.test", TYPE_A);
    assert_eq!(
        address(&up.exchange(&q, 1, &out).await.unwrap()),
        expected("a.test")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        Unbound::connections_to(ub.doh.port()),
        0,
        "unbound closed it"
    );
    assert_eq!(
        address(&up.exchange(&q, 1, &out).await.unwrap()),
        expected("a.test")
    );
    assert_eq!(up.connections_opened(), 2);
}

#[tokio::test]
async fn a_server_without_http2_is_named() {
    // TLS without ALPN: a DoT server of the test's own.
    let Some(pki) = Pki::new() else {
        return;
    };
    let addr = dropping_server(&pki).await;
    let up = HttpsUpstream::new(
        addr,
        "dns.test".into(),
        "/dns-query".into(),
        pki.client_config(),
    );
    let q = build::query(1, "a.test", TYPE_A);
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err().to_string();
    assert!(e.contains("did not agree to HTTP/2"), "{e}");
}
