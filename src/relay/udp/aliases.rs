//! The fake-ip destinations of one UDP session, and which of them a reply
//! answers, so that it reaches the client from the fake address it wrote
//! to. No sockets here: the session keeps an [`Aliases`] under its lock.
//!
//! A fake-ip destination goes one of two ways (`UdpRelay::forward_named`):
//!
//! - **resolved**: through `direct`, to a real address of its name; a
//!   reply from that address answers it;
//! - **by name**: through a proxy that takes names (SOCKS5 ATYP 3, a
//!   shadowsocks header), which resolves the name itself. The reply names
//!   its source as the server likes: by the same name (matched by name
//!   and port), or by the address it resolved, which tproxyd never saw.
//!   Such an address is taken for the most recent destination by name on
//!   that leg with the same port that has no address yet, and remembered
//!   for it. A reply from another address whose port matches no
//!   destination by name passes with its own source, as full cone wants.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::sys;

/// Most fake-ip destinations one session keeps; beyond that the oldest is
/// forgotten (its next datagram resolves its name again, or makes it a
/// destination by name again).
pub(super) const MAX_ALIASES: usize = 64;

/// How datagrams to a fake-ip address leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Via {
    /// To a real address of the name (resolved here).
    Real(SocketAddr),
    /// To the name itself, through the leg of outbound key `outbound`;
    /// `seen`: the address its replies came from, once one did.
    Name {
        name: Arc<str>,
        outbound: u32,
        seen: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    fake: SocketAddr,
    via: Via,
}

/// Where a reply came from, as the upstream says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyFrom<'a> {
    Addr(SocketAddr),
    /// A name (its bytes as the server wrote them) and port.
    Name(&'a [u8], u16),
}

/// The fake-ip destinations of one session, oldest first.
#[derive(Debug, Default)]
pub(super) struct Aliases {
    list: Vec<Alias>,
}

impl Aliases {
    /// The real address datagrams to `fake` go to, once its name was
    /// resolved for this session (never for one sent by name).
    pub(super) fn real_of(&self, fake: SocketAddr) -> Option<SocketAddr> {
        self.list.iter().find_map(|a| match a.via {
            Via::Real(real) if a.fake == fake => Some(real),
            _ => None,
        })
    }

    /// Datagrams to `fake` go to `real`, and replies from `real` reach
    /// the client from `fake`.
    pub(super) fn add_real(&mut self, fake: SocketAddr, real: SocketAddr) {
        self.set(fake, Via::Real(sys::normalize(real)));
    }

    /// Datagrams to `fake` go by `name` through the leg of `outbound`.
    /// Kept as it is when it already goes so (its address seen stays).
    pub(super) fn add_named(&mut self, fake: SocketAddr, name: &Arc<str>, outbound: u32) {
        let same = |a: &Alias| {
            a.fake == fake
                && matches!(&a.via, Via::Name { name: n, outbound: o, .. } if n == name && *o == outbound)
        };
        if self.list.iter().any(same) {
            return;
        }
        self.set(
            fake,
            Via::Name {
                name: Arc::clone(name),
                outbound,
                seen: None,
            },
        );
    }

    fn set(&mut self, fake: SocketAddr, via: Via) {
        match self.list.iter_mut().find(|a| a.fake == fake) {
            Some(alias) => alias.via = via,
            None => {
                if self.list.len() >= MAX_ALIASES {
                    self.list.remove(0);
                }
                self.list.push(Alias { fake, via });
            }
        }
    }

    /// The address a reply that came through the leg of `outbound` from
    /// `from` reaches the client from: the fake-ip address it answers, or
    /// its own address. None: it names a source by name that no
    /// destination of this session has (nothing to answer from).
    pub(super) fn reply_source(
        &mut self,
        outbound: u32,
        from: ReplyFrom<'_>,
    ) -> Option<SocketAddr> {
        match from {
            ReplyFrom::Name(name, port) => self.list.iter().find_map(|a| match &a.via {
                Via::Name {
                    name: n,
                    outbound: o,
                    ..
                } if *o == outbound
                    && a.fake.port() == port
                    && n.as_bytes().eq_ignore_ascii_case(name) =>
                {
                    Some(a.fake)
                }
                _ => None,
            }),
            ReplyFrom::Addr(addr) => {
                let addr = sys::normalize(addr);
                let known = self.list.iter().find(|a| match &a.via {
                    Via::Real(real) => *real == addr,
                    Via::Name {
                        outbound: o, seen, ..
                    } => *o == outbound && *seen == Some(addr),
                });
                if let Some(alias) = known {
                    return Some(alias.fake);
                }
                // The address the server resolved a name to: the latest
                // destination by name on this leg, on that port, that has
                // none yet.
                let unseen = self.list.iter_mut().rev().find(|a| {
                    a.fake.port() == addr.port()
                        && matches!(&a.via, Via::Name { outbound: o, seen: None, .. } if *o == outbound)
                });
                match unseen {
                    Some(alias) => {
                        if let Via::Name { seen, .. } = &mut alias.via {
                            *seen = Some(addr);
                        }
                        Some(alias.fake)
                    }
                    None => Some(addr),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const PROXY: u32 = 7;
    const OTHER: u32 = 8;

    #[test]
    fn a_resolved_destination_answers_from_its_real_address() {
        let mut a = Aliases::default();
        let (fake, real) = (sa("198.18.0.1:7"), sa("192.0.2.9:7"));
        assert_eq!(a.real_of(fake), None);
        assert_eq!(a.reply_source(0, ReplyFrom::Addr(real)), Some(real));
        a.add_real(fake, real);
        assert_eq!(a.real_of(fake), Some(real));
        assert_eq!(a.reply_source(0, ReplyFrom::Addr(real)), Some(fake));
        // IPv4-mapped, as a dual-stack socket says it.
        let mapped = sa("[::ffff:192.0.2.9]:7");
        assert_eq!(a.reply_source(0, ReplyFrom::Addr(mapped)), Some(fake));
        let other = sa("192.0.2.9:8");
        assert_eq!(a.reply_source(0, ReplyFrom::Addr(other)), Some(other));
    }

    /// A server that answers by the name it was sent: matched by name
    /// (any case) and port, on the leg it was sent through only.
    #[test]
    fn a_reply_from_the_name_answers_from_the_fake_address() {
        let mut a = Aliases::default();
        let fake = sa("198.18.0.5:443");
        let name: Arc<str> = "quic.example".into();
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"quic.example", 443)),
            None
        );
        a.add_named(fake, &name, PROXY);
        assert_eq!(a.real_of(fake), None, "never resolved here");
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"QUIC.Example", 443)),
            Some(fake)
        );
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"quic.example", 444)),
            None
        );
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"other.example", 443)),
            None
        );
        assert_eq!(
            a.reply_source(OTHER, ReplyFrom::Name(b"quic.example", 443)),
            None
        );
    }

    /// A server that answers from the address it resolved: the first such
    /// reply on the leg and port is taken for the name and remembered;
    /// other remotes keep their own address (full cone).
    #[test]
    fn a_reply_from_the_resolved_address_answers_from_the_fake_address() {
        let mut a = Aliases::default();
        let fake = sa("198.18.0.5:443");
        let name: Arc<str> = "quic.example".into();
        a.add_named(fake, &name, PROXY);
        let real = sa("192.0.2.50:443");
        // Another leg, or another port: not this destination's.
        assert_eq!(a.reply_source(OTHER, ReplyFrom::Addr(real)), Some(real));
        let stun = sa("192.0.2.60:3478");
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(stun)), Some(stun));
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(real)), Some(fake));
        // Remembered: again, also as IPv4-mapped.
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(real)), Some(fake));
        let mapped = sa("[::ffff:192.0.2.50]:443");
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(mapped)), Some(fake));
        // Taken: another remote on the same port is itself.
        let peer = sa("192.0.2.51:443");
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(peer)), Some(peer));
        // Sending again by the same name keeps what was learned.
        a.add_named(fake, &name, PROXY);
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(real)), Some(fake));
    }

    /// Two names on the same port: each gets the next new address, the
    /// latest destination first, and none is given twice.
    #[test]
    fn two_names_on_one_port_each_learn_their_own_address() {
        let mut a = Aliases::default();
        let (f1, f2) = (sa("198.18.0.1:443"), sa("198.18.0.2:443"));
        a.add_named(f1, &Arc::from("one.example"), PROXY);
        a.add_named(f2, &Arc::from("two.example"), PROXY);
        let (r2, r1) = (sa("192.0.2.2:443"), sa("192.0.2.1:443"));
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(r2)), Some(f2));
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(r1)), Some(f1));
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(r2)), Some(f2));
        assert_eq!(a.reply_source(PROXY, ReplyFrom::Addr(r1)), Some(f1));
    }

    /// A destination that changes its way (a reload moved its name from
    /// direct to the proxy) is the new way only; the list is bounded,
    /// the oldest forgotten first.
    #[test]
    fn a_destination_has_one_way_and_the_list_is_bounded() {
        let mut a = Aliases::default();
        let (fake, real) = (sa("198.18.0.1:53"), sa("192.0.2.9:53"));
        a.add_real(fake, real);
        a.add_named(fake, &Arc::from("dns.example"), PROXY);
        assert_eq!(a.real_of(fake), None);
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"dns.example", 53)),
            Some(fake)
        );
        for i in 0..MAX_ALIASES as u16 {
            a.add_real(sa(&format!("198.18.1.0:{}", 1000 + i)), sa("192.0.2.20:1"));
        }
        assert_eq!(
            a.reply_source(PROXY, ReplyFrom::Name(b"dns.example", 53)),
            None
        );
        assert_eq!(a.list.len(), MAX_ALIASES);
    }
}
