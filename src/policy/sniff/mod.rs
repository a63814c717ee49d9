//! Sniffing: what a flow's first bytes say about it (TLS SNI, HTTP Host),
//! as pure parsers over byte slices.
//!
//! Nothing here does I/O. A stream parser is given everything peeked so
//! far, from the first byte, and answers [`Sniff`]: it wants more bytes,
//! it found its protocol (with a host name when there was a valid one),
//! or the bytes are not its protocol. Parsers are restartable (each call
//! starts over) so the caller can simply peek again after more bytes
//! arrive; the inputs are small (bounded by [`MAX_SNIFF_BYTES`]), so the
//! repeated work does not matter. The datagram sniffer (`quic.rs`, QUIC
//! Initial) is stateful instead: a datagram is read once, so it keeps the
//! CRYPTO bytes of the first datagrams itself, and hands the reassembled
//! ClientHello to the same TLS parser.
//!
//! The name found is only used to route (route-only): the flow still goes
//! to the address the client chose. See `tls.rs` for why an SNI is no
//! proof of the destination.

pub mod http;
#[cfg(feature = "quic")]
pub mod quic;
pub mod tls;

use crate::config::SniffProtocol;

/// Most bytes any parser looks at: a ClientHello with post-quantum key
/// shares is ~1.8 KiB today, and the TLS record limit is 16 KiB; 64 KiB
/// leaves room for a handshake message fragmented over several records
/// while keeping a bound on what one flow can make us hold.
pub const MAX_SNIFF_BYTES: usize = 64 * 1024;

/// What one parser says about the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// The bytes so far are a valid beginning; more are needed.
    NeedMore,
    /// The protocol is this parser's. `host` is the name the client asked
    /// for, when it sent one that is a valid host name (never an IP
    /// literal); a ClientHello without SNI is still TLS.
    Found { host: Option<String> },
    /// Not this protocol (or malformed, or beyond the bound).
    NotThis,
}

/// The outcome of sniffing a stream: its protocol and host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub protocol: SniffProtocol,
    pub host: Option<String>,
}

/// What all stream parsers together say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSniff {
    /// At least one parser still wants more bytes.
    NeedMore,
    /// Found (Some) or nothing recognised (None).
    Done(Option<Sniffed>),
}

/// Runs every stream parser over the first bytes of a TCP flow.
pub fn sniff_stream(bytes: &[u8]) -> StreamSniff {
    let mut need_more = false;
    for (protocol, answer) in [
        (SniffProtocol::Tls, tls::sniff(bytes)),
        (SniffProtocol::Http, http::sniff(bytes)),
    ] {
        match answer {
            Sniff::Found { host } => return StreamSniff::Done(Some(Sniffed { protocol, host })),
            Sniff::NeedMore => need_more = true,
            Sniff::NotThis => {}
        }
    }
    if need_more && bytes.len() < MAX_SNIFF_BYTES {
        StreamSniff::NeedMore
    } else {
        StreamSniff::Done(None)
    }
}

/// Destination ports where sniffing is skipped: FTP, SSH, SMTP (25, 587),
/// POP3, IMAP and MySQL are server-first. Their clients send nothing until
/// the server's banner, which only comes once the flow is connected
/// upstream, so waiting for their first bytes would add the whole sniff
/// wait to every connection. 465, 993 and 995 are implicit TLS and 5432
/// (PostgreSQL) is client-first, but their names are rarely worth a rule;
/// sing-box skips the mail ports the same way.
pub const SERVER_FIRST_PORTS: [u16; 11] = [21, 22, 25, 110, 143, 465, 587, 993, 995, 3306, 5432];

/// Whether flows to `port` are routed by address at once, unsniffed.
pub fn skip_port(port: u16) -> bool {
    SERVER_FIRST_PORTS.contains(&port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_sniff_tells_tls_http_and_neither_apart() {
        assert_eq!(sniff_stream(b""), StreamSniff::NeedMore);
        assert_eq!(sniff_stream(b"\x16"), StreamSniff::NeedMore);
        assert_eq!(sniff_stream(b"G"), StreamSniff::NeedMore);
        assert_eq!(
            sniff_stream(b"SSH-2.0-OpenSSH\r\n"),
            StreamSniff::Done(None)
        );
        assert_eq!(sniff_stream(b"\x00"), StreamSniff::Done(None));
        assert_eq!(
            sniff_stream(b"GET / HTTP/1.1\r\nHost: A.example\r\n\r\n"),
            StreamSniff::Done(Some(Sniffed {
                protocol: SniffProtocol::Http,
                host: Some("a.example".into())
            }))
        );
        let hello = tls::tests::client_hello(Some("b.example"), 32);
        assert_eq!(
            sniff_stream(&tls::tests::records(&hello, 16384)),
            StreamSniff::Done(Some(Sniffed {
                protocol: SniffProtocol::Tls,
                host: Some("b.example".into())
            }))
        );
    }

    #[test]
    fn server_first_ports_are_skipped() {
        for p in [21, 22, 25, 110, 143, 465, 587, 993, 995, 3306, 5432] {
            assert!(skip_port(p), "{p}");
        }
        for p in [80, 443, 8080, 8443, 7] {
            assert!(!skip_port(p), "{p}");
        }
    }
}
