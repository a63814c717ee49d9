//! The first bytes of a TCP flow, as the sniffer sees them: a TLS
//! ClientHello (reassembled across records) or an HTTP/1 request. Any
//! name it reports must be a valid host name, never an IP literal, since
//! rules match it and `send_domain` hands it to the upstream; the answer
//! must not depend on bytes past a complete ClientHello or request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::policy::sniff::{sniff_stream, StreamSniff, MAX_SNIFF_BYTES};

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && !host.ends_with('.')
        && host.parse::<std::net::IpAddr>().is_err()
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_SNIFF_BYTES + 16)];
    let answer = sniff_stream(data);
    if let StreamSniff::Done(Some(found)) = &answer {
        if let Some(host) = &found.host {
            assert!(valid_host(host), "invalid host {host:?}");
        }
        // More bytes after a complete hello or request change nothing.
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\x16\x03\x01 trailing");
        if longer.len() <= MAX_SNIFF_BYTES {
            assert_eq!(sniff_stream(&longer), answer);
        }
    }
});
