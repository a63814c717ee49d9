//! SOCKS5 wire format (RFC 1928) and username/password sub-negotiation
//! (RFC 1929), as pure functions over byte slices.
//!
//! Nothing here does I/O, so every message can be checked against byte
//! sequences written out from the RFCs, including truncated and malformed
//! replies, which must come back as errors and never as panics.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub const VERSION: u8 = 0x05;
pub const AUTH_VERSION: u8 = 0x01;

pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_USER_PASS: u8 = 0x02;
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;

pub const CMD_CONNECT: u8 = 0x01;
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;

pub const ATYP_V4: u8 = 0x01;
pub const ATYP_DOMAIN: u8 = 0x03;
pub const ATYP_V6: u8 = 0x04;

pub const REP_SUCCEEDED: u8 = 0x00;
pub const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;

/// Largest UDP request header to an address: RSV(2) FRAG(1) ATYP(1)
/// IPv6(16) PORT(2). A datagram to a name (a fake-ip destination) has a
/// longer one, up to [`MAX_UDP_NAMED_HEADER`]; it goes out as a slice of
/// its own ([`write_udp_header_named`]) rather than in the headroom.
pub const MAX_UDP_HEADER: usize = 22;

/// Largest UDP request header to a name: RSV FRAG ATYP LEN, 255 bytes of
/// name, PORT.
pub const MAX_UDP_NAMED_HEADER: usize = 4 + 1 + 255 + 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("server speaks SOCKS version {0}, not 5")]
    BadVersion(u8),
    #[error("username/password reply has version {0}, not 1")]
    BadAuthVersion(u8),
    #[error("server chose method {0:#04x}, which was not offered")]
    UnofferedMethod(u8),
    #[error("unknown address type {0:#04x}")]
    BadAddressType(u8),
    #[error("message truncated: {needed} bytes needed, {got} received")]
    Truncated { needed: usize, got: usize },
    #[error("reserved byte is {0:#04x}, not 0")]
    BadReserved(u8),
    #[error("domain name in reply is not valid UTF-8")]
    BadDomain,
    #[error("fragmented datagram (FRAG={0}); fragments are not supported and are dropped")]
    Fragmented(u8),
    #[error("domain name of {0} bytes does not fit a SOCKS5 request (at most 255)")]
    DomainTooLong(usize),
}

/// An address as SOCKS5 carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(a) => write!(f, "{a}"),
            Address::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// The method-selection message: offer no-auth, and username/password too
/// when credentials are configured (a server that needs none may pick 0).
pub fn greeting(with_user_pass: bool) -> &'static [u8] {
    if with_user_pass {
        &[VERSION, 2, METHOD_NO_AUTH, METHOD_USER_PASS]
    } else {
        &[VERSION, 1, METHOD_NO_AUTH]
    }
}

/// What the server chose in answer to [`greeting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodChoice {
    NoAuth,
    UserPass,
    NoneAcceptable,
}

pub fn parse_method_choice(
    reply: [u8; 2],
    offered_user_pass: bool,
) -> Result<MethodChoice, ProtoError> {
    if reply[0] != VERSION {
        return Err(ProtoError::BadVersion(reply[0]));
    }
    match reply[1] {
        METHOD_NO_AUTH => Ok(MethodChoice::NoAuth),
        METHOD_USER_PASS if offered_user_pass => Ok(MethodChoice::UserPass),
        METHOD_NONE_ACCEPTABLE => Ok(MethodChoice::NoneAcceptable),
        other => Err(ProtoError::UnofferedMethod(other)),
    }
}

/// RFC 1929 request: VER(1) ULEN(1) UNAME PLEN(1) PASSWD.
/// The config limits both to 1..=255 bytes; longer input is cut rather
/// than letting a length byte wrap.
pub fn user_pass_request(username: &str, password: &str) -> Vec<u8> {
    let u = &username.as_bytes()[..username.len().min(255)];
    let p = &password.as_bytes()[..password.len().min(255)];
    let mut out = Vec::with_capacity(3 + u.len() + p.len());
    out.push(AUTH_VERSION);
    out.push(u.len() as u8);
    out.extend_from_slice(u);
    out.push(p.len() as u8);
    out.extend_from_slice(p);
    out
}

/// RFC 1929 reply: VER(1) STATUS(1); status 0 is success.
pub fn parse_user_pass_reply(reply: [u8; 2]) -> Result<bool, ProtoError> {
    // RFC 1929 says VER is 1; some servers echo 5. Accept both, as curl does.
    if reply[0] != AUTH_VERSION && reply[0] != VERSION {
        return Err(ProtoError::BadAuthVersion(reply[0]));
    }
    Ok(reply[1] == 0)
}

/// Appends ATYP ADDR PORT for an IP address.
fn put_address(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A request: VER CMD RSV ATYP DST.ADDR DST.PORT.
pub fn request(cmd: u8, dst: &SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, cmd, 0x00]);
    put_address(&mut out, dst);
    out
}

/// A request naming `target`, which may be a domain: ATYP 3, one length
/// byte, the name, the port. The name is sent as given; callers pass only
/// validated host names.
pub fn request_to(cmd: u8, target: &Address) -> Result<Vec<u8>, ProtoError> {
    match target {
        Address::Ip(dst) => Ok(request(cmd, dst)),
        Address::Domain(name, port) => {
            let len =
                u8::try_from(name.len()).map_err(|_| ProtoError::DomainTooLong(name.len()))?;
            let mut out = Vec::with_capacity(7 + name.len());
            out.extend_from_slice(&[VERSION, cmd, 0x00, ATYP_DOMAIN, len]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&port.to_be_bytes());
            Ok(out)
        }
    }
}

/// Bytes still to read for a reply, given its first five bytes
/// (VER REP RSV ATYP and the first address byte).
pub fn reply_remaining(head: [u8; 5]) -> Result<usize, ProtoError> {
    if head[0] != VERSION {
        return Err(ProtoError::BadVersion(head[0]));
    }
    // The address has been partly read: one byte of it is in `head`.
    match head[3] {
        ATYP_V4 => Ok(4 - 1 + 2),
        ATYP_V6 => Ok(16 - 1 + 2),
        ATYP_DOMAIN => Ok(usize::from(head[4]) + 2),
        other => Err(ProtoError::BadAddressType(other)),
    }
}

/// A parsed reply: REP and BND.ADDR/BND.PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u8,
    pub bound: Address,
}

/// Parses a whole reply (VER REP RSV ATYP BND.ADDR BND.PORT).
pub fn parse_reply(buf: &[u8]) -> Result<Reply, ProtoError> {
    need(buf, 4)?;
    if buf[0] != VERSION {
        return Err(ProtoError::BadVersion(buf[0]));
    }
    let (bound, _) = parse_address(&buf[3..])?;
    Ok(Reply {
        code: buf[1],
        bound,
    })
}

fn need(buf: &[u8], needed: usize) -> Result<(), ProtoError> {
    if buf.len() < needed {
        Err(ProtoError::Truncated {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Parses ATYP ADDR PORT at the start of `buf`; returns it and its length.
pub fn parse_address(buf: &[u8]) -> Result<(Address, usize), ProtoError> {
    need(buf, 1)?;
    match buf[0] {
        ATYP_V4 => {
            need(buf, 7)?;
            let ip = Ipv4Addr::new(buf[1], buf[2], buf[3], buf[4]);
            let port = u16::from_be_bytes([buf[5], buf[6]]);
            Ok((Address::Ip(SocketAddrV4::new(ip, port).into()), 7))
        }
        ATYP_V6 => {
            need(buf, 19)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&buf[1..17]);
            let port = u16::from_be_bytes([buf[17], buf[18]]);
            Ok((
                Address::Ip(SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, 0).into()),
                19,
            ))
        }
        ATYP_DOMAIN => {
            need(buf, 2)?;
            let len = usize::from(buf[1]);
            need(buf, 2 + len + 2)?;
            let name = std::str::from_utf8(&buf[2..2 + len]).map_err(|_| ProtoError::BadDomain)?;
            let port = u16::from_be_bytes([buf[2 + len], buf[3 + len]]);
            Ok((Address::Domain(name.to_string(), port), 4 + len))
        }
        other => Err(ProtoError::BadAddressType(other)),
    }
}

/// Writes the UDP request header RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT
/// into the start of `out` and returns its length (10 or 22 bytes).
/// `out` must hold [`MAX_UDP_HEADER`] bytes.
pub fn write_udp_header(out: &mut [u8], dst: &SocketAddr) -> usize {
    out[0] = 0;
    out[1] = 0;
    out[2] = 0;
    match dst {
        SocketAddr::V4(a) => {
            out[3] = ATYP_V4;
            out[4..8].copy_from_slice(&a.ip().octets());
            out[8..10].copy_from_slice(&a.port().to_be_bytes());
            10
        }
        SocketAddr::V6(a) => {
            out[3] = ATYP_V6;
            out[4..20].copy_from_slice(&a.ip().octets());
            out[20..22].copy_from_slice(&a.port().to_be_bytes());
            22
        }
    }
}

/// Writes the UDP request header naming `name`:`port` (ATYP 3) into the
/// start of `out` and returns its length; `out` must hold
/// [`MAX_UDP_NAMED_HEADER`] bytes. The name is sent as given: callers
/// pass only validated host names.
pub fn write_udp_header_named(out: &mut [u8], name: &str, port: u16) -> Result<usize, ProtoError> {
    let len = u8::try_from(name.len()).map_err(|_| ProtoError::DomainTooLong(name.len()))?;
    let end = 5 + name.len();
    let header = out
        .get_mut(..end + 2)
        .ok_or(ProtoError::DomainTooLong(name.len()))?;
    header[..5].copy_from_slice(&[0, 0, 0, ATYP_DOMAIN, len]);
    header[5..end].copy_from_slice(name.as_bytes());
    header[end..].copy_from_slice(&port.to_be_bytes());
    Ok(end + 2)
}

/// The header length [`write_udp_header`] writes for `dst`.
pub fn udp_header_len(dst: &SocketAddr) -> usize {
    if dst.is_ipv4() {
        10
    } else {
        22
    }
}

/// Reads a UDP datagram's header; returns the remote it came from and the
/// offset of the payload. FRAG ≠ 0 is refused (RFC 1928 lets a client
/// that does not reassemble drop fragments).
pub fn parse_udp_header(buf: &[u8]) -> Result<(Address, usize), ProtoError> {
    need(buf, 4)?;
    if buf[0] != 0 || buf[1] != 0 {
        return Err(ProtoError::BadReserved(buf[0] | buf[1]));
    }
    if buf[2] != 0 {
        return Err(ProtoError::Fragmented(buf[2]));
    }
    let (addr, len) = parse_address(&buf[3..])?;
    Ok((addr, 3 + len))
}

/// RFC 1928 section 6, for log lines a person can act on.
pub fn reply_meaning(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unassigned reply code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn greetings_list_the_offered_methods() {
        assert_eq!(greeting(false), [0x05, 0x01, 0x00]);
        assert_eq!(greeting(true), [0x05, 0x02, 0x00, 0x02]);
    }

    #[test]
    fn method_choice() {
        assert_eq!(parse_method_choice([5, 0], false), Ok(MethodChoice::NoAuth));
        assert_eq!(
            parse_method_choice([5, 2], true),
            Ok(MethodChoice::UserPass)
        );
        assert_eq!(
            parse_method_choice([5, 0xFF], true),
            Ok(MethodChoice::NoneAcceptable)
        );
        // A method we did not offer is a protocol error, not a silent accept.
        assert_eq!(
            parse_method_choice([5, 2], false),
            Err(ProtoError::UnofferedMethod(2))
        );
        assert_eq!(
            parse_method_choice([5, 1], true),
            Err(ProtoError::UnofferedMethod(1))
        );
        // An HTTP proxy answering "HTTP/1.1 400" starts with 'H'.
        assert_eq!(
            parse_method_choice([b'H', b'T'], false),
            Err(ProtoError::BadVersion(b'H'))
        );
    }

    #[test]
    fn rfc1929_request_and_reply() {
        assert_eq!(
            user_pass_request("alice", "pw"),
            [0x01, 5, b'a', b'l', b'i', b'c', b'e', 2, b'p', b'w']
        );
        assert_eq!(parse_user_pass_reply([1, 0]), Ok(true));
        assert_eq!(parse_user_pass_reply([1, 1]), Ok(false));
        assert_eq!(parse_user_pass_reply([1, 0xFF]), Ok(false));
        assert_eq!(
            parse_user_pass_reply([4, 0]),
            Err(ProtoError::BadAuthVersion(4))
        );
    }

    #[test]
    fn connect_requests_as_in_rfc1928() {
        // VER CMD RSV ATYP=1 198.51.100.10 port 80
        assert_eq!(
            request(CMD_CONNECT, &sa("198.51.100.10:80")),
            [0x05, 0x01, 0x00, 0x01, 198, 51, 100, 10, 0x00, 0x50]
        );
        // ATYP=4 2001:db8::1 port 443
        assert_eq!(
            request(CMD_CONNECT, &sa("[2001:db8::1]:443")),
            [
                0x05, 0x01, 0x00, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                0x01, 0xBB
            ]
        );
        // UDP ASSOCIATE naming where datagrams will come *from*: 0.0.0.0:0.
        assert_eq!(
            request(CMD_UDP_ASSOCIATE, &sa("0.0.0.0:0")),
            [0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn domain_connect_requests_as_in_rfc1928() {
        // VER CMD RSV ATYP=3 LEN "a.example" port 443
        let mut want = vec![0x05, 0x01, 0x00, 0x03, 9];
        want.extend_from_slice(b"a.example");
        want.extend_from_slice(&[0x01, 0xBB]);
        assert_eq!(
            request_to(CMD_CONNECT, &Address::Domain("a.example".into(), 443)),
            Ok(want)
        );
        assert_eq!(
            request_to(CMD_CONNECT, &Address::Ip(sa("198.51.100.10:80"))),
            Ok(request(CMD_CONNECT, &sa("198.51.100.10:80")))
        );
        let long = "a".repeat(256);
        assert_eq!(
            request_to(CMD_CONNECT, &Address::Domain(long, 1)),
            Err(ProtoError::DomainTooLong(256))
        );
        // What goes out parses back the same (the reply format is shared).
        let req = request_to(CMD_CONNECT, &Address::Domain("b.example".into(), 8443)).unwrap();
        assert_eq!(
            parse_address(&req[3..]),
            Ok((Address::Domain("b.example".into(), 8443), req.len() - 3))
        );
        assert_eq!(
            Address::Domain("b.example".into(), 8443).to_string(),
            "b.example:8443"
        );
    }

    #[test]
    fn replies_with_each_address_type() {
        let v4 = [0x05, 0x00, 0x00, 0x01, 203, 0, 113, 2, 0x04, 0x38];
        assert_eq!(reply_remaining(v4[..5].try_into().unwrap()), Ok(5));
        assert_eq!(
            parse_reply(&v4),
            Ok(Reply {
                code: 0,
                bound: Address::Ip(sa("203.0.113.2:1080"))
            })
        );

        let mut v6 = vec![0x05, 0x00, 0x00, 0x04];
        v6.extend_from_slice(&"2001:db8:2::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x9C, 0x40]);
        assert_eq!(reply_remaining(v6[..5].try_into().unwrap()), Ok(17));
        assert_eq!(
            parse_reply(&v6).unwrap().bound,
            Address::Ip(sa("[2001:db8:2::2]:40000"))
        );

        let dom = [0x05, 0x00, 0x00, 0x03, 3, b'a', b'b', b'c', 0x00, 0x35];
        assert_eq!(reply_remaining(dom[..5].try_into().unwrap()), Ok(5));
        assert_eq!(
            parse_reply(&dom).unwrap().bound,
            Address::Domain("abc".into(), 53)
        );

        let refused = [0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_reply(&refused).unwrap().code, 5);
        assert_eq!(reply_meaning(5), "connection refused");
        assert_eq!(reply_meaning(7), "command not supported");
    }

    #[test]
    fn malformed_and_truncated_replies_are_errors() {
        assert_eq!(
            reply_remaining([4, 0, 0, 1, 0]),
            Err(ProtoError::BadVersion(4))
        );
        assert_eq!(
            reply_remaining([5, 0, 0, 9, 0]),
            Err(ProtoError::BadAddressType(9))
        );
        assert_eq!(
            parse_reply(&[5, 0, 0, 1, 1, 2]),
            Err(ProtoError::Truncated { needed: 7, got: 3 })
        );
        assert_eq!(
            parse_reply(&[5, 0]),
            Err(ProtoError::Truncated { needed: 4, got: 2 })
        );
        assert_eq!(
            parse_reply(&[5, 0, 0, 4, 1]),
            Err(ProtoError::Truncated { needed: 19, got: 2 })
        );
        assert_eq!(
            parse_reply(&[5, 0, 0, 3, 10, b'a']),
            Err(ProtoError::Truncated { needed: 14, got: 3 })
        );
        assert_eq!(
            parse_reply(&[5, 0, 0, 3, 1, 0xFF, 0, 1]),
            Err(ProtoError::BadDomain)
        );
        assert_eq!(
            parse_reply(&[5, 0, 0, 3]),
            Err(ProtoError::Truncated { needed: 2, got: 1 })
        );
        // Every prefix of a valid reply is an error, never a panic.
        let v6 = [
            5u8, 0, 0, 4, 0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80,
        ];
        for n in 0..v6.len() {
            assert!(parse_reply(&v6[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(parse_reply(&v6).is_ok());
    }

    #[test]
    fn udp_header_round_trip_and_rfc_layout() {
        let mut buf = [0u8; MAX_UDP_HEADER];
        let n = write_udp_header(&mut buf, &sa("198.51.100.10:53"));
        assert_eq!(&buf[..n], [0, 0, 0, 1, 198, 51, 100, 10, 0, 53]);
        assert_eq!(n, udp_header_len(&sa("198.51.100.10:53")));

        let n6 = write_udp_header(&mut buf, &sa("[2001:db8:100::10]:7"));
        assert_eq!(n6, 22);
        assert_eq!(n6, udp_header_len(&sa("[::1]:7")));
        let mut datagram = buf[..n6].to_vec();
        datagram.extend_from_slice(b"payload");
        let (addr, off) = parse_udp_header(&datagram).unwrap();
        assert_eq!(addr, Address::Ip(sa("[2001:db8:100::10]:7")));
        assert_eq!(&datagram[off..], b"payload");
    }

    /// A datagram to a name: ATYP 3 as in RFC 1928 §7, and it parses
    /// back (a reply naming its source by domain).
    #[test]
    fn udp_header_to_a_name() {
        let mut out = [0u8; MAX_UDP_NAMED_HEADER];
        let n = write_udp_header_named(&mut out, "quic.example", 443).unwrap();
        let mut want = vec![0, 0, 0, 3, 12];
        want.extend_from_slice(b"quic.example");
        want.extend_from_slice(&[0x01, 0xbb]);
        assert_eq!(&out[..n], &want[..]);
        let mut datagram = want.clone();
        datagram.extend_from_slice(b"payload");
        assert_eq!(
            parse_udp_header(&datagram).unwrap(),
            (Address::Domain("quic.example".into(), 443), want.len())
        );
        let longest = "a".repeat(255);
        assert_eq!(
            write_udp_header_named(&mut out, &longest, 1).unwrap(),
            MAX_UDP_NAMED_HEADER
        );
        let too_long = "a".repeat(256);
        assert_eq!(
            write_udp_header_named(&mut out, &too_long, 1),
            Err(ProtoError::DomainTooLong(256))
        );
        // Too small a buffer is an error, never a panic.
        assert!(write_udp_header_named(&mut [0u8; 8], "quic.example", 443).is_err());
    }

    #[test]
    fn udp_fragments_and_garbage_are_refused() {
        assert_eq!(
            parse_udp_header(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 53, b'x']),
            Err(ProtoError::Fragmented(1))
        );
        assert_eq!(
            parse_udp_header(&[0, 1, 0, 1]),
            Err(ProtoError::BadReserved(1))
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0]),
            Err(ProtoError::Truncated { needed: 4, got: 3 })
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 7, 1]),
            Err(ProtoError::BadAddressType(7))
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 3, b'a', b'b', b'c', 0, 53, b'!']),
            Ok((Address::Domain("abc".into(), 53), 10))
        );
    }
}
