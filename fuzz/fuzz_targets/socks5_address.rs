//! The SOCKS5 address parsers on their own: the UDP datagram header
//! (RSV FRAG ATYP ADDR PORT) of every relayed reply datagram, ATYP ADDR
//! PORT, and the agreement between `reply_remaining` (how much of a reply
//! to read) and `parse_reply`.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tproxyd::outbound::socks5::proto::{self, Address, ProtoError};

/// ATYP ADDR PORT, written independently of the parser (the oracle).
fn encode(addr: &Address) -> Vec<u8> {
    let mut out = Vec::new();
    let port = match addr {
        Address::Ip(SocketAddr::V4(a)) => {
            out.push(proto::ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Address::Ip(SocketAddr::V6(a)) => {
            out.push(proto::ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Address::Domain(name, port) => {
            out.push(proto::ATYP_DOMAIN);
            out.push(u8::try_from(name.len()).expect("domain longer than 255 bytes"));
            out.extend_from_slice(name.as_bytes());
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    // The datagram header, as the relay parses each reply datagram.
    match proto::parse_udp_header(data) {
        Ok((addr, off)) => {
            assert!(off <= data.len());
            let mut header = vec![0, 0, 0];
            header.extend(encode(&addr));
            assert_eq!(&data[..off], &header[..], "UDP header does not round-trip");
            if let Address::Ip(ip) = addr {
                // tproxyd's own writer makes the same bytes.
                let mut out = [0u8; proto::MAX_UDP_HEADER];
                let n = proto::write_udp_header(&mut out, &ip);
                assert_eq!(n, proto::udp_header_len(&ip));
                assert_eq!(&out[..n], &data[..off]);
            }
        }
        Err(ProtoError::Truncated { needed, got }) => assert!(needed > got),
        Err(_) => {}
    }

    // ATYP ADDR PORT alone.
    if let Ok((addr, n)) = proto::parse_address(data) {
        assert_eq!(&data[..n], &encode(&addr)[..]);
    }

    // The client reads five bytes, asks reply_remaining how many more, and
    // parses exactly that many: the two must agree on every input.
    if let Some(head) = data.get(..5) {
        let head: [u8; 5] = head.try_into().unwrap();
        if let Ok(rest) = proto::reply_remaining(head) {
            if let Some(whole) = data.get(..5 + rest) {
                match proto::parse_reply(whole) {
                    Ok(reply) => {
                        let mut bytes = vec![proto::VERSION, reply.code, whole[2]];
                        bytes.extend(encode(&reply.bound));
                        assert_eq!(whole, &bytes[..]);
                    }
                    Err(ProtoError::BadDomain) => {}
                    Err(e) => panic!("reply_remaining said {rest} more bytes, then: {e}"),
                }
            }
        }
    }
});
