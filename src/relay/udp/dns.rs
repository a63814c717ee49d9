//! The relay's DNS hooks: what `crate::dns` does with datagrams to port
//! 53 and the replies from it, wired into the session path at three
//! points (before and after a query's route decision, and per reply).

use std::net::SocketAddr;
use std::sync::Arc;

use super::{UdpRelay, UDP_HEADROOM};
use crate::dns::{message, Query, PORT};
use crate::outbound::OutboundError;
use crate::policy::Choice;

/// A DNS query with its question: what DNS over TCP can carry.
fn is_dns_query(payload: &[u8]) -> bool {
    message::Header::parse(payload).is_ok_and(|h| !h.is_response() && h.qdcount == 1)
        && message::question(payload).is_ok()
}

impl UdpRelay {
    /// Before the route decision: the destination to route and send a
    /// datagram to (the one asked, or `[dns] server` for DNS), or None
    /// when it was answered here (a filtered AAAA question).
    pub(super) fn dns_query(
        self: &Arc<Self>,
        client: SocketAddr,
        dst: SocketAddr,
        buf: &[u8],
    ) -> Option<SocketAddr> {
        let Some(dns) = self.router.dns().filter(|_| dst.port() == PORT) else {
            return Some(dst);
        };
        match dns.on_query(client, dst, &buf[UDP_HEADROOM..]) {
            Query::Forward(to) => Some(to),
            Query::Answer(answer) => {
                let relay = Arc::clone(self);
                tokio::spawn(async move {
                    relay.replies.send(dst, client, &answer, &relay.stats).await;
                });
                None
            }
        }
    }

    /// After the route decision: when the chosen outbound carries DNS as
    /// DNS over TCP, hands the query to it and returns true; the answer
    /// goes to the client from `asked`, the address it wrote to.
    pub(super) fn dns_over_tcp(
        self: &Arc<Self>,
        client: SocketAddr,
        asked: SocketAddr,
        dst: SocketAddr,
        choice: &Choice,
        buf: &[u8],
    ) -> bool {
        let Some(dns) = self.router.dns().filter(|_| dst.port() == PORT) else {
            return false;
        };
        if !dns.wants_tcp(choice.key, &choice.outbound) {
            return false;
        }
        // Only a DNS query can go as DNS over TCP: anything else sent to
        // port 53 (another protocol, a malformed query) is relayed as the
        // UDP it is, never dropped here.
        if !is_dns_query(&buf[UDP_HEADROOM..]) {
            return false;
        }
        let (relay, dns) = (Arc::clone(self), Arc::clone(dns));
        let (key, outbound) = (choice.key, Arc::clone(&choice.outbound));
        let query = buf[UDP_HEADROOM..].to_vec();
        tokio::spawn(async move {
            if let Some(answer) = dns.exchange_tcp(key, &outbound, dst, &query).await {
                relay
                    .replies
                    .send(asked, client, &answer, &relay.stats)
                    .await;
            }
        });
        true
    }

    /// A reply from port 53 on its way to `client`: the address to send it
    /// from (the one asked, for a hijacked query); names are learned.
    pub(super) fn dns_reply(
        &self,
        client: SocketAddr,
        from: SocketAddr,
        reply: &[u8],
    ) -> SocketAddr {
        match self.router.dns().filter(|_| from.port() == PORT) {
            Some(dns) => dns.on_reply(client, from, reply),
            None => from,
        }
    }

    /// How opening an upstream went: a SOCKS5 server that takes UDP
    /// carries DNS as UDP, one that refuses UDP ASSOCIATE as DNS over TCP.
    pub(super) fn dns_udp_opened(&self, key: u32, name: &str, result: Result<(), &OutboundError>) {
        if let Some(dns) = self.router.dns() {
            dns.udp_opened(key, name, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dns_queries_are_taken_for_dns_over_tcp() {
        assert!(is_dns_query(&message::build::query(7, "example.com", 1)));
        for other in [&b"udp echo me"[..], b"", &[0u8; 12]] {
            assert!(!is_dns_query(other), "{other:?}");
        }
        let query = message::build::query(7, "example.com", 1);
        let answer = message::build::response(&query, &[]);
        assert!(!is_dns_query(&answer), "an answer is no query");
    }
}
