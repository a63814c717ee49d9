//! The relay's DNS hooks on the carrying side: sending what the decision
//! stage said about a query (an answer made here, DNS over TCP through an
//! outbound), and what `crate::dns` does with the replies from port 53
//! and with how an upstream opened. Which query goes where is decided in
//! `decide.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use super::UdpRelay;
use crate::dns::listen::Now;
use crate::dns::PORT;
use crate::outbound::OutboundError;
use crate::policy::Choice;

impl UdpRelay {
    /// Sends `answer`, made here for a query of `client`, back to it from
    /// `from` (the address it asked).
    pub(super) fn send_dns_answer(
        self: &Arc<Self>,
        client: SocketAddr,
        from: SocketAddr,
        answer: Vec<u8>,
    ) {
        let relay = Arc::clone(self);
        tokio::spawn(async move {
            relay
                .replies
                .send(from, client, &answer, &relay.stats)
                .await;
        });
    }

    /// Has the named resolvers answer `query` of `client`; the answer goes
    /// back from `from`, the address it asked.
    pub(super) fn send_dns_resolved(
        self: &Arc<Self>,
        client: SocketAddr,
        from: SocketAddr,
        query: &[u8],
    ) {
        let Some(dns) = self.router.dns() else {
            return;
        };
        // A cache hit (or a rejection) needs no server: only its sending
        // is left, without the query's copy or the resolver's task state.
        match dns.answer_now(query, client) {
            Now::Later => {}
            Now::Answer(answer) => return self.send_dns_answer(client, from, answer),
            Now::Nothing => return,
        }
        let (relay, dns) = (Arc::clone(self), Arc::clone(dns));
        let query = query.to_vec();
        tokio::spawn(async move {
            if let Some(answer) = dns.resolve(&query, client).await {
                relay
                    .replies
                    .send(from, client, &answer, &relay.stats)
                    .await;
            }
        });
    }

    /// Carries `query` to `dst` as DNS over TCP through `choice`'s
    /// outbound; the answer goes to the client from `from`, the address it
    /// wrote to.
    pub(super) fn send_dns_over_tcp(
        self: &Arc<Self>,
        client: SocketAddr,
        from: SocketAddr,
        dst: SocketAddr,
        choice: Choice,
        query: &[u8],
    ) {
        let Some(dns) = self.router.dns() else {
            return;
        };
        let (relay, dns) = (Arc::clone(self), Arc::clone(dns));
        let query = query.to_vec();
        tokio::spawn(async move {
            if let Some(answer) = dns
                .exchange_tcp(choice.key, &choice.outbound, dst, &query)
                .await
            {
                relay
                    .replies
                    .send(from, client, &answer, &relay.stats)
                    .await;
            }
        });
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
