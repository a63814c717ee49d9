//! The SOCKS5 client's whole handshake (method selection, RFC 1929 login,
//! CONNECT or UDP ASSOCIATE reply with every ATYP), run by the real
//! `Socks5Client::handshake` against a server whose bytes are the input.
//!
//! Input: one byte of options, then what the server sends.
//! Bit 0: credentials configured; bit 1: UDP ASSOCIATE instead of CONNECT;
//! bit 2: an IPv6 server; bits 3..=5: the most bytes one read returns
//! minus one (0 = one byte at a time, to exercise partial reads).
#![no_main]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tproxyd::outbound::Credentials;
use tproxyd::outbound::socks5::proto::{self, Address};
use tproxyd::outbound::socks5::{Socks5Client, Socks5Error};

/// A server that has already sent `input` and takes whatever is written.
struct Scripted<'a> {
    input: &'a [u8],
    read: usize,
    chunk: usize,
    written: Vec<u8>,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = &self.input[self.read..];
        let n = left.len().min(buf.remaining()).min(self.chunk);
        buf.put_slice(&left[..n]);
        self.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// ATYP ADDR PORT, written independently of the parser (the oracle).
fn encode(addr: &Address) -> Vec<u8> {
    let mut out = Vec::new();
    match addr {
        Address::Ip(SocketAddr::V4(a)) => {
            out.push(proto::ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        Address::Ip(SocketAddr::V6(a)) => {
            out.push(proto::ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
        }
        Address::Domain(name, _) => {
            out.push(proto::ATYP_DOMAIN);
            out.push(u8::try_from(name.len()).expect("domain longer than 255 bytes"));
            out.extend_from_slice(name.as_bytes());
        }
    }
    let port = match addr {
        Address::Ip(a) => a.port(),
        Address::Domain(_, p) => *p,
    };
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&opts, input)) = data.split_first() else {
        return;
    };
    let with_auth = opts & 1 != 0;
    let udp = opts & 2 != 0;
    let server: SocketAddr = if opts & 4 != 0 {
        "[2001:db8::2]:1080".parse().unwrap()
    } else {
        "203.0.113.2:1080".parse().unwrap()
    };
    let client = Socks5Client {
        server,
        auth: with_auth.then(|| Credentials {
            username: "alice".into(),
            password: "pw".into(),
        }),
        mark: 0,
        connect_timeout: Duration::from_secs(1),
        send_domain: false,
        dns_over_tcp: false,
    };
    // CONNECT names an address, or (send_domain) a host name.
    let (cmd, dst): (u8, Address) = if udp {
        (
            proto::CMD_UDP_ASSOCIATE,
            Address::Ip("0.0.0.0:0".parse().unwrap()),
        )
    } else if opts & 0x40 != 0 {
        (
            proto::CMD_CONNECT,
            Address::Domain("named.example".into(), 443),
        )
    } else {
        (
            proto::CMD_CONNECT,
            Address::Ip("198.51.100.10:80".parse().unwrap()),
        )
    };
    let mut stream = Scripted {
        input,
        read: 0,
        chunk: usize::from((opts >> 3) & 7) + 1,
        written: Vec::new(),
    };
    // The stream is always ready, so one poll runs the handshake to its end.
    let result = {
        let mut fut = pin!(client.handshake(&mut stream, cmd, &dst));
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("handshake pending on a stream that is always ready"),
        }
    };

    // What the client sent starts with its greeting, then the login (if
    // the server chose it), then the request.
    assert!(stream.written.starts_with(proto::greeting(with_auth)));
    let Ok(request) = proto::request_to(cmd, &dst) else {
        panic!("a request for {dst:?} must encode");
    };
    match &result {
        Ok(reply) => {
            assert!(stream.written.ends_with(&request));
            // The reply is the last thing read; it re-encodes to the same
            // bytes (RSV is not checked, so it is copied).
            let mut bytes = vec![proto::VERSION, reply.code, 0];
            bytes.extend(encode(&reply.bound));
            let end = stream.read;
            let start = end - bytes.len();
            bytes[2] = input[start + 2];
            assert_eq!(&input[start..end], &bytes[..], "reply does not round-trip");
            if udp {
                match client.udp_relay(reply.clone()) {
                    Ok(relay) => {
                        assert!(!relay.ip().is_unspecified(), "unspecified relay {relay}");
                        assert_eq!(relay.ip().to_canonical(), relay.ip(), "mapped relay");
                        assert_eq!(
                            Some(relay.port()),
                            match &reply.bound {
                                Address::Ip(a) => Some(a.port()),
                                Address::Domain(..) => None,
                            }
                        );
                    }
                    // Refused only for a failure code, a relay named by
                    // domain, or a relay port of 0 (datagrams would vanish).
                    Err(e) => assert!(
                        reply.code != proto::REP_SUCCEEDED
                            || matches!(e, Socks5Error::DomainRelay { .. })
                            || (matches!(e, Socks5Error::NoRelayPort { .. })
                                && matches!(&reply.bound, Address::Ip(a) if a.port() == 0)),
                        "{e}"
                    ),
                }
            } else {
                let granted = client.connect_outcome(reply, &dst).is_ok();
                assert_eq!(granted, reply.code == proto::REP_SUCCEEDED);
            }
        }
        Err(e) => {
            // Every failure is a typed error with a message; none is empty.
            assert!(!e.to_string().is_empty());
        }
    }
});
