//! DNS over TLS against a real server: unbound (Debian's, DoT and DoH
//! from one instance) answering a local zone on loopback, with a CA and
//! certificate made by `openssl` for the test; and a TLS server of the
//! test's own for a connection closed under a query. Nothing leaves
//! loopback: unbound answers only from `local-data` (every other name is
//! NXDOMAIN: `local-zone: "." static`) and never queries.
//!
//! Missing `unbound` or `openssl` skips, and fails under CI
//! (scripts/setup-test-deps installs both). unbound and the CA are
//! `crate::testbed::unbound`'s, shared with tests/e2e_dns_servers.rs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::dns::message::{build, Header, RecordData, TYPE_A};
pub(crate) use crate::testbed::unbound::{Pki, Unbound};

/// A client config trusting `pki`'s CA alone.
pub(crate) fn trusting(pki: &Pki) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    assert_eq!(add_pem(&mut roots, &pki.ca), (1, 0));
    client_config(roots)
}

/// The names unbound answers: `a.test` and `n<i>.test` (i < 64), each
/// with one A record, `192.0.2.1` and `198.51.100.<i>`.
pub(crate) fn expected(name: &str) -> IpAddr {
    match name.strip_prefix('n').and_then(|r| r.strip_suffix(".test")) {
        Some(i) => IpAddr::V4(Ipv4Addr::new(198, 51, 100, i.parse().unwrap())),
        None => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    }
}

pub(crate) fn direct() -> Arc<Outbound> {
    Arc::new(Outbound::Direct(crate::outbound::direct::Direct {
        mark: 0,
        connect_timeout: Duration::from_secs(2),
    }))
}

/// The only A record of `answer`.
pub(crate) fn address(answer: &[u8]) -> IpAddr {
    let records = message::answers(answer).unwrap();
    match records.as_slice() {
        [r] => match r.data {
            RecordData::Addr(ip) => ip,
            ref other => panic!("not an address: {other:?}"),
        },
        other => panic!("{} records: {other:?}", other.len()),
    }
}

#[tokio::test]
async fn an_answer_over_tls_with_the_name_or_the_ip_checked() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let out = direct();
    for name in ["dns.test", ""] {
        let up = TlsUpstream::new(ub.dot, name.to_string(), trusting(&ub.pki));
        let q = build::query(0x1234, "a.test", TYPE_A);
        let a = up.exchange(&q, 1, &out).await.unwrap();
        assert_eq!(Header::parse(&a).unwrap().id, 0x1234);
        assert_eq!(address(&a), expected("a.test"));
        // A name outside the zone: NXDOMAIN, still an answer.
        let q = build::query(9, "elsewhere.example", TYPE_A);
        let a = up.exchange(&q, 1, &out).await.unwrap();
        assert_eq!(Header::parse(&a).unwrap().rcode(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_one_tls_connection() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let out = direct();
    let up = Arc::new(TlsUpstream::new(
        ub.dot,
        "dns.test".into(),
        trusting(&ub.pki),
    ));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (up, out) = (Arc::clone(&up), Arc::clone(&out));
        tasks.push(tokio::spawn(async move {
            // Every client picks the same id: answers must not mix.
            let name = format!("n{i}.test");
            let a = up.exchange(&build::query(7, &name, TYPE_A), 1, &out).await;
            (name, a)
        }));
    }
    for t in tasks {
        let (name, a) = t.await.unwrap();
        let a = a.unwrap();
        assert_eq!(Header::parse(&a).unwrap().id, 7);
        assert_eq!(address(&a), expected(&name), "{name}");
    }
    assert_eq!(up.connections_opened(), 1);
    assert_eq!(Unbound::connections_to(ub.dot.port()), 1);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_with_the_fix() {
    let Some(ub) = Unbound::start(30_000) else {
        return;
    };
    let up = TlsUpstream::new(ub.dot, "wrong.example".into(), trusting(&ub.pki));
    let q = build::query(1, "a.test", TYPE_A);
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err().to_string();
    assert!(e.contains("\"wrong.example\""), "{e}");
    assert!(
        e.contains("dns.test"),
        "names what the certificate holds: {e}"
    );
    assert!(e.contains("set server_name"), "says the fix: {e}");

    // A CA nobody configured: says so.
    let up = TlsUpstream::new(
        ub.dot,
        "dns.test".into(),
        client_config(RootCertStore::empty()),
    );
    let e = up.exchange(&q, 1, &direct()).await.unwrap_err().to_string();
    assert!(e.contains("not signed by a CA tproxyd trusts"), "{e}");
}

#[tokio::test]
async fn a_connection_the_server_closed_is_opened_again() {
    // unbound closes a connection idle for 300 ms.
    let Some(ub) = Unbound::start(300) else {
        return;
    };
    let out = direct();
    let up = TlsUpstream::new(ub.dot, "dns.test".into(), trusting(&ub.pki));
    let q = build::query(5, "a.test", TYPE_A);
    assert_eq!(
        address(&up.exchange(&q, 1, &out).await.unwrap()),
        expected("a.test")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        Unbound::connections_to(ub.dot.port()),
        0,
        "unbound closed it"
    );
    assert_eq!(
        address(&up.exchange(&q, 1, &out).await.unwrap()),
        expected("a.test")
    );
    assert_eq!(up.connections_opened(), 2);
}

/// A DoT server of the test's own: its first connection reads one query
/// and closes without answering; later ones answer every query with the
/// query marked as a response.
pub(crate) async fn dropping_server(pki: &Pki) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    if n == 0 {
                        return;
                    }
                    q[2] |= 0x80;
                    let mut out = len.to_vec();
                    out.extend_from_slice(&q);
                    if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_query_whose_connection_closes_is_asked_again_on_a_new_one() {
    let Some(pki) = Pki::new() else {
        return;
    };
    let addr = dropping_server(&pki).await;
    let up = TlsUpstream::new(addr, "dns.test".into(), trusting(&pki));
    let q = build::query(0x4242, "a.test", TYPE_A);
    let a = up.exchange(&q, 1, &direct()).await.unwrap();
    assert_eq!(Header::parse(&a).unwrap().id, 0x4242);
    assert_eq!(
        message::question(&a).unwrap(),
        message::question(&q).unwrap()
    );
    assert_eq!(up.connections_opened(), 2);
}

#[test]
fn a_server_name_that_is_no_name_is_said_at_every_query() {
    let Some(pki) = Pki::new() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let up = TlsUpstream::new(
        "127.0.0.1:853".parse().unwrap(),
        "not a name".into(),
        trusting(&pki),
    );
    let q = build::query(1, "a.test", TYPE_A);
    let e = rt
        .block_on(up.exchange(&q, 1, &direct()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"not a name\" is not a host name"), "{e}");
}

#[test]
fn answers_must_match_the_question_and_the_id() {
    let q = build::query(3, "A.test", TYPE_A);
    let mut a = build::response(&q, &[]);
    assert!(answers(&q, &a));
    // 0x20 case not kept by the resolver: still the same question.
    let lower = build::response(&build::query(3, "a.test", TYPE_A), &[]);
    assert!(answers(&q, &lower));
    message::set_id(&mut a, 4);
    assert!(!answers(&q, &a));
    let other = build::response(&build::query(3, "b.test", TYPE_A), &[]);
    assert!(!answers(&q, &other));
    assert!(!answers(&q, &q), "a query is no answer");
    assert!(!answers(&q, &[0; 5]));
}

#[test]
fn the_system_bundle_is_read_as_pem() {
    // Debian's bundle when this machine has one; otherwise a made-up
    // bundle of one certificate and some garbage.
    let mut roots = RootCertStore::empty();
    let (added, _) = match std::fs::read(SYSTEM_BUNDLES[0]) {
        Ok(pem) => add_pem(&mut roots, &pem),
        Err(_) => {
            let Some(pki) = Pki::new() else {
                return;
            };
            let mut pem = b"junk\n".to_vec();
            pem.extend_from_slice(&pki.ca);
            add_pem(&mut roots, &pem)
        }
    };
    assert!(added >= 1);
    assert!(root_store().len() >= webpki_roots::TLS_SERVER_ROOTS.len());
    // Built once, shared.
    assert!(Arc::ptr_eq(&tls_config(), &tls_config()));
}
