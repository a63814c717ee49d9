//! The one `IP:PORT` parser for everything a user writes as an address:
//! listen addresses, servers, the quick-start flags. It lives here, above
//! both `config` and `outbound`, so that neither imports the other for it.

use std::net::SocketAddr;

/// `text` as `IP:PORT` (surrounding spaces ignored). A host name is
/// refused, with a message that says why.
pub fn parse_ip_port(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?} is not IP:PORT (like \"203.0.113.2:1080\" or \"[2001:db8::2]:1080\"); a host \
             name is refused on purpose: resolving it could go through the DNS tproxyd itself \
             captures"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_and_port_parse_and_host_names_are_refused() {
        assert_eq!(
            parse_ip_port(" [2001:db8::2]:1080 "),
            Ok("[2001:db8::2]:1080".parse().unwrap())
        );
        let e = parse_ip_port("proxy.example:1080").unwrap_err();
        assert!(
            e.starts_with("\"proxy.example:1080\" is not IP:PORT"),
            "{e}"
        );
    }
}
