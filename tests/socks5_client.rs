//! The SOCKS5 client against scripted servers on loopback: correct
//! exchanges byte for byte, and misbehaving servers (garbage, silence,
//! truncation, refusals) that must give a clear error, never a panic or a
//! hang.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tproxyd::outbound::socks5::{Socks5Client, Socks5Error};
use tproxyd::outbound::Credentials;
use tproxyd::outbound::{Outbound, UdpRecv, UdpUpstream, UDP_HEADROOM};

fn client(server: SocketAddr, auth: Option<Credentials>) -> Socks5Client {
    Socks5Client {
        server,
        auth,
        // 0: no SO_MARK, so these tests need no privilege.
        mark: 0,
        connect_timeout: Duration::from_millis(500),
        send_domain: false,
        dns_over_tcp: false,
    }
}

/// A one-connection server running `script` on the accepted stream.
async fn fake_server<F, Fut>(script: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        script(stream).await;
    });
    addr
}

async fn expect(stream: &mut TcpStream, bytes: &[u8]) {
    let mut got = vec![0u8; bytes.len()];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, bytes);
}

fn dst() -> SocketAddr {
    "198.51.100.10:80".parse().unwrap()
}

const CONNECT_V4: [u8; 10] = [5, 1, 0, 1, 198, 51, 100, 10, 0, 80];

#[tokio::test]
async fn connect_exchange_is_byte_exact_and_then_carries_data() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        expect(&mut s, &CONNECT_V4).await;
        s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0x30, 0x39])
            .await
            .unwrap();
        expect(&mut s, b"ping").await;
        s.write_all(b"pong").await.unwrap();
    })
    .await;
    let mut stream = client(server, None).connect(dst()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");
}

/// send_domain: the outbound names the sniffed host (ATYP 3) with the
/// original port; an invalid name falls back to the address.
#[tokio::test]
async fn send_domain_connects_by_name_through_the_outbound() {
    let mut connect_domain = vec![5, 1, 0, 3, 17];
    connect_domain.extend_from_slice(b"via-proxy.example");
    connect_domain.extend_from_slice(&[0, 80]);
    for (host, want) in [
        (Some("via-proxy.example"), connect_domain),
        (Some("198.51.100.10"), CONNECT_V4.to_vec()),
        (None, CONNECT_V4.to_vec()),
    ] {
        let server = fake_server(move |mut s| async move {
            expect(&mut s, &[5, 1, 0]).await;
            s.write_all(&[5, 0]).await.unwrap();
            expect(&mut s, &want).await;
            s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0x30, 0x39])
                .await
                .unwrap();
        })
        .await;
        let mut c = client(server, None);
        c.send_domain = true;
        Outbound::Socks5(c)
            .connect_tcp(dst(), host)
            .await
            .unwrap_or_else(|e| panic!("{host:?}: {e}"));
    }
}

#[tokio::test]
async fn username_password_follow_rfc1929() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 2, 0, 2]).await;
        s.write_all(&[5, 2]).await.unwrap();
        expect(
            &mut s,
            &[1, 5, b'a', b'l', b'i', b'c', b'e', 3, b'p', b'w', b'd'],
        )
        .await;
        s.write_all(&[1, 0]).await.unwrap();
        expect(&mut s, &CONNECT_V4).await;
        s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    })
    .await;
    let creds = Credentials {
        username: "alice".into(),
        password: "pwd".into(),
    };
    client(server, Some(creds)).connect(dst()).await.unwrap();
}

#[tokio::test]
async fn wrong_password_names_the_user() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 2, 0, 2]).await;
        s.write_all(&[5, 2]).await.unwrap();
        let mut req = [0u8; 9];
        s.read_exact(&mut req).await.unwrap();
        s.write_all(&[1, 1]).await.unwrap();
    })
    .await;
    let creds = Credentials {
        username: "bob".into(),
        password: "xyz".into(),
    };
    let err = client(server, Some(creds))
        .connect(dst())
        .await
        .unwrap_err();
    assert!(matches!(err, Socks5Error::AuthFailed { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("refused username \"bob\": wrong username or password"),
        "{err}"
    );
}

#[tokio::test]
async fn server_demanding_a_login_we_lack_says_how_to_fix_it() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0xFF]).await.unwrap();
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(
        matches!(err, Socks5Error::CredentialsNeeded { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("--username/--password"), "{err}");
}

#[tokio::test]
async fn garbage_reply_is_a_protocol_error() {
    let server = fake_server(|mut s| async move {
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(matches!(err, Socks5Error::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("version 72"), "{err}");
}

#[tokio::test]
async fn truncated_reply_is_an_error_not_a_hang() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        expect(&mut s, &CONNECT_V4).await;
        // Half a reply, then close.
        s.write_all(&[5, 0, 0, 1, 127, 0]).await.unwrap();
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(matches!(err, Socks5Error::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn unknown_address_type_in_reply_is_refused() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        expect(&mut s, &CONNECT_V4).await;
        s.write_all(&[5, 0, 0, 9, 0, 0, 0, 0, 0, 0]).await.unwrap();
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(
        err.to_string().contains("unknown address type 0x09"),
        "{err}"
    );
}

#[tokio::test]
async fn silent_server_times_out() {
    let server = fake_server(|s| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(s);
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(matches!(err, Socks5Error::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn refusal_codes_are_explained() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        expect(&mut s, &CONNECT_V4).await;
        s.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    })
    .await;
    let err = client(server, None).connect(dst()).await.unwrap_err();
    assert!(
        err.to_string().contains("connection refused (reply 5)"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_server_is_reported_as_such() {
    // Bind then drop: a loopback port with no listener.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = client(port, None).connect(dst()).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(
        err.to_string().contains("cannot reach SOCKS5 server"),
        "{err}"
    );
}

#[tokio::test]
async fn udp_associate_refusal_says_udp_is_not_supported() {
    let server = fake_server(|mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        expect(&mut s, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        s.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    })
    .await;
    let err = client(server, None).udp_associate().await.unwrap_err();
    assert!(
        err.to_string().contains("does not support UDP ASSOCIATE"),
        "{err}"
    );
    assert!(err.to_string().contains("--tcp-only"), "{err}");
}

/// The server answers BND.ADDR 0.0.0.0: datagrams must go to the server's
/// own IP with BND.PORT. Checks the header both ways, FRAG dropping, and
/// that closing the control connection ends the association.
#[tokio::test]
async fn udp_association_with_unspecified_relay_address() {
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let server = fake_server(move |mut s| async move {
        expect(&mut s, &[5, 1, 0]).await;
        s.write_all(&[5, 0]).await.unwrap();
        // DST names where datagrams come from: the wildcard, not a target.
        expect(&mut s, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        let p = relay_port.to_be_bytes();
        s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, p[0], p[1]])
            .await
            .unwrap();
        let _ = close_rx.await;
        drop(s);
    })
    .await;
    let outbound = Outbound::Socks5(client(server, None));
    let upstream = outbound.open_udp().await.unwrap();
    let UdpUpstream::Socks5(assoc) = &upstream else {
        panic!("expected a SOCKS5 association")
    };
    assert_eq!(
        assoc.relay,
        format!("127.0.0.1:{relay_port}").parse().unwrap()
    );

    let target: SocketAddr = "198.51.100.10:53".parse().unwrap();
    let mut buf = vec![0u8; UDP_HEADROOM];
    buf.extend_from_slice(b"query");
    upstream.send(&mut buf, target).await.unwrap();
    let mut got = [0u8; 64];
    let (n, from) = relay.recv_from(&mut got).await.unwrap();
    assert_eq!(
        &got[..n],
        &[0, 0, 0, 1, 198, 51, 100, 10, 0, 53, b'q', b'u', b'e', b'r', b'y']
    );

    // A fragment is dropped, a whole datagram is delivered with its source.
    relay
        .send_to(&[0, 0, 1, 1, 198, 51, 100, 10, 0, 53, b'x'], from)
        .await
        .unwrap();
    relay
        .send_to(&[0, 0, 0, 1, 198, 51, 100, 11, 0, 53, b'a', b'n'], from)
        .await
        .unwrap();
    let mut rbuf = vec![0u8; 2048];
    let first = upstream.recv(&mut rbuf).await.unwrap();
    assert!(
        matches!(first, UdpRecv::Dropped(ref why) if why.contains("FRAG=1")),
        "{first:?}"
    );
    let second = upstream.recv(&mut rbuf).await.unwrap();
    let UdpRecv::Datagram { from, start, end } = second else {
        panic!("expected a datagram, got {second:?}")
    };
    assert_eq!(from, "198.51.100.11:53".parse().unwrap());
    assert_eq!(&rbuf[start..end], b"an");

    close_tx.send(()).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(2), upstream.closed())
        .await
        .expect("association must end when the control connection closes");
    assert!(reason.contains("closed"), "{reason}");
}

/// A server that accepts UDP ASSOCIATE but names relay port 0 (with
/// BND.ADDR 0.0.0.0 or ::): there is nowhere to send datagrams, and the
/// session must fail to open, saying so, instead of sending into nothing.
#[tokio::test]
async fn udp_association_with_relay_port_0_is_refused_clearly() {
    for bound in [
        &[1u8, 0, 0, 0, 0][..],
        &[4u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
    ] {
        let bound = bound.to_vec();
        let server = fake_server(move |mut s| async move {
            expect(&mut s, &[5, 1, 0]).await;
            s.write_all(&[5, 0]).await.unwrap();
            expect(&mut s, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
            let mut reply = vec![5, 0, 0];
            reply.extend_from_slice(&bound);
            reply.extend_from_slice(&[0, 0]);
            s.write_all(&reply).await.unwrap();
            // Keeps the control connection open, as a real server would.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        let err = Outbound::Socks5(client(server, None))
            .open_udp()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&server.to_string()), "{text}");
        assert!(text.contains("no usable UDP relay port"), "{text}");
    }
}
