//! DNS over HTTPS against unbound on loopback (the harness is DoT's:
//! `super::super::tls::tests`), and against servers of the tests' own for
//! what unbound will not do on demand (GOAWAY under a query, no ALPN h2).

use std::time::Duration;

use super::*;
use crate::dns::message::{build, Header, TYPE_A};
use crate::dns::upstream::tls::tests::{address, direct, dropping_server, expected, Pki, Unbound};

fn doh(ub: &Unbound, name: &str, path: &str) -> HttpsUpstream {
    HttpsUpstream::new(
        ub.doh,
        name.to_string(),
        path.to_string(),
        crate::dns::upstream::tls::tests::trusting(&ub.pki),
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
        crate::dns::upstream::tls::tests::trusting(&pki),
    );
    let q = build::query(1, "a.test", TYPE_A);
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err().to_string();
    assert!(e.contains("did not agree to HTTP/2"), "{e}");
}

/// A DoH server of the test's own (HTTP/2 over rustls, ALPN h2): answers
/// every query with the query marked as a response, and records the ids
/// it was sent. Its first connection, at its first request, sends GOAWAY
/// (no stream processed) and closes, leaving that request unanswered.
async fn goaway_server(pki: &Pki) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ids);
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    if n == 0 {
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                        continue;
                    }
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut q = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            q.extend_from_slice(&chunk);
                        }
                        lock(&seen).extend(message::id(&q));
                        q[2] |= 0x80;
                        let response = http::Response::builder()
                            .header(CONTENT_TYPE, DNS_MESSAGE)
                            .body(())
                            .unwrap();
                        if let Ok(mut send) = respond.send_response(response, false) {
                            let _ = send.send_data(Bytes::from(q), true);
                        }
                    });
                }
            });
        }
    });
    (addr, ids)
}

#[tokio::test]
async fn a_goaway_under_a_query_asks_again_on_a_new_connection_with_id_zero() {
    let Some(pki) = Pki::new() else {
        return;
    };
    let (addr, ids) = goaway_server(&pki).await;
    let up = HttpsUpstream::new(
        addr,
        "dns.test".into(),
        "/dns-query".into(),
        crate::dns::upstream::tls::tests::trusting(&pki),
    );
    let q = build::query(0x5151, "a.test", TYPE_A);
    let a = up.exchange(&q, 1, &direct()).await.unwrap();
    assert_eq!(Header::parse(&a).unwrap().id, 0x5151);
    assert_eq!(up.connections_opened(), 2);
    // RFC 8484 4.1: id 0 on the wire.
    assert_eq!(*lock(&ids), vec![0]);
}
