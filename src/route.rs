//! The route decision: given a flow's client and original destination,
//! refuse it or pick the outbound that carries it.
//!
//! Every flow first passes the loop check (a flow to tproxyd's own
//! listener is refused, whatever the rules say); then the policy's rules
//! pick the outbound. A flow that carries no name of its own is given the
//! name last learned for its destination from a DNS answer, when some
//! rule looks at names (route only: the destination stays as it is).
//!
//! With fake-ip, a flow to a fake address is routed by the name the pool
//! gave that address, before any rule on destination addresses (the fake
//! address matches none), and refused when the address has no name.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::dns::fakeip::FakePool;
use crate::dns::Dns;
use crate::policy::{Choice, FlowMeta, Policy};
use crate::sys;

/// What the route decision says about one flow.
#[derive(Debug)]
pub enum Decision {
    Forward(Choice),
    /// The original destination is tproxyd's own listener: forwarding it
    /// would connect to ourselves, forever.
    RefuseLoop,
    /// The destination is a fake-ip address that stands for no name (the
    /// pool was lost, or recycled the address long ago): refused at once,
    /// never sent to the fake address.
    RefuseFake,
}

/// What the fake-ip pool says about a destination address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeDst {
    /// Not a fake address (or no fake-ip): routed as it is.
    Real,
    /// A fake address that stands for no name.
    Unmapped,
    /// A fake address given to this name.
    Name(Arc<str>),
}

/// The loop check and the current policy. Clones share the policy: a
/// reload swaps it for all of them at once, and each new flow reads it
/// once (one atomic load), while flows already decided keep what they
/// were given.
#[derive(Debug, Clone)]
pub struct Router {
    listen: SocketAddr,
    policy: Arc<ArcSwap<Policy>>,
    dns: Option<Arc<Dns>>,
    fake: Option<Arc<FakePool>>,
}

impl Router {
    pub fn new(listen: SocketAddr, policy: Policy) -> Self {
        Router {
            listen: sys::normalize(listen),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            dns: None,
            fake: None,
        }
    }

    /// The router with DNS handling: learned names for the decisions, and
    /// the UDP relay's hooks for port 53.
    pub fn with_dns(mut self, dns: Arc<Dns>) -> Self {
        self.dns = Some(dns);
        self
    }

    pub fn dns(&self) -> Option<&Arc<Dns>> {
        self.dns.as_ref()
    }

    /// The router with a fake-ip pool: flows to its addresses go by name.
    pub fn with_fake_ip(mut self, pool: Arc<FakePool>) -> Self {
        self.fake = Some(pool);
        self
    }

    pub fn fake_ip(&self) -> Option<&Arc<FakePool>> {
        self.fake.as_ref()
    }

    /// What `ip` is to the fake-ip pool (a use of its name, if it has one).
    pub fn fake_dst(&self, ip: std::net::IpAddr) -> FakeDst {
        match &self.fake {
            Some(pool) if pool.is_fake(ip) => match pool.name_of(ip) {
                Some(name) => FakeDst::Name(name),
                None => FakeDst::Unmapped,
            },
            _ => FakeDst::Real,
        }
    }

    /// Decides with the policy of the moment.
    pub fn decide(&self, flow: &FlowMeta<'_>) -> Decision {
        self.decide_with(&self.policy.load(), flow)
    }

    /// Decides with `policy` (one a flow loaded once and decides with
    /// twice: before and after sniffing).
    pub fn decide_with(&self, policy: &Policy, flow: &FlowMeta<'_>) -> Decision {
        if self.is_listener(flow.dst) {
            return Decision::RefuseLoop;
        }
        match self.fake_dst(flow.dst.ip()) {
            FakeDst::Real => {}
            FakeDst::Unmapped => return Decision::RefuseFake,
            FakeDst::Name(name) => return Decision::Forward(policy.decide_by_name(flow, &name)),
        }
        // Names are kept only when a rule looks at them, so this lookup is
        // skipped (None at once) otherwise.
        if flow.domain.is_none() {
            if let Some(name) = self
                .dns
                .as_ref()
                .and_then(|d| d.learned_name(flow.dst.ip()))
            {
                let named = FlowMeta {
                    domain: Some(&name),
                    ..*flow
                };
                return Decision::Forward(policy.decide(&named));
            }
        }
        Decision::Forward(policy.decide(flow))
    }

    /// The policy of the moment, held for as long as the caller keeps it.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The policy of the moment, for a short look (no reference count).
    pub fn current(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Makes `policy` the one every new flow reads.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    /// Whether `dst` is the listener itself: its port, and either its
    /// exact address or, for a wildcard listener, any local address.
    fn is_listener(&self, dst: SocketAddr) -> bool {
        let dst = sys::normalize(dst);
        if dst.port() != self.listen.port() {
            return false;
        }
        if self.listen.ip().is_unspecified() {
            dst.ip().is_unspecified() || dst.ip().is_loopback() || sys::is_local_address(dst.ip())
        } else {
            dst.ip() == self.listen.ip()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Network, RawConfig};

    fn router(listen: &str) -> Router {
        let cfg = RawConfig::from_toml(
            &format!("listen = \"{listen}\"\n[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n"),
            "t",
        )
        .unwrap()
        .validate(&|_| None)
        .unwrap();
        Router::new(cfg.listen, Policy::from_config(&cfg).unwrap())
    }

    fn decide(r: &Router, net: Network, dst: &str) -> Decision {
        let src = "192.0.2.2:40000".parse().unwrap();
        r.decide(&FlowMeta::addresses(net, src, dst.parse().unwrap()))
    }

    #[test]
    fn flows_to_the_listener_itself_are_refused() {
        let r = router("[::]:1090");
        for (net, dst) in [
            (Network::Tcp, "127.0.0.1:1090"),
            (Network::Udp, "[::1]:1090"),
            (Network::Tcp, "[::ffff:127.0.0.1]:1090"),
        ] {
            assert!(
                matches!(decide(&r, net, dst), Decision::RefuseLoop),
                "{dst}"
            );
        }
        // The same port on a remote host is an ordinary flow.
        for dst in ["198.51.100.1:1090", "127.0.0.1:80"] {
            assert!(
                matches!(decide(&r, Network::Tcp, dst), Decision::Forward(_)),
                "{dst}"
            );
        }
        let specific = router("127.0.0.1:1090");
        assert!(matches!(
            decide(&specific, Network::Tcp, "127.0.0.1:1090"),
            Decision::RefuseLoop
        ));
        assert!(matches!(
            decide(&specific, Network::Tcp, "127.0.0.2:1090"),
            Decision::Forward(_)
        ));
    }

    /// A flow without a name of its own takes the one learned from a DNS
    /// answer for its destination; a sniffed name still comes first.
    #[test]
    fn learned_names_feed_domain_rules() {
        use crate::dns::message::build::{query, response, Answer};
        use crate::dns::message::TYPE_A;
        use crate::dns::Dns;
        let text = "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
                    [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                    [route]\nfinal = \"direct\"\n\
                    [[route.rules]]\ndomain_suffix = [\"via-proxy.example\"]\noutbound = \"proxy\"\n\
                    [firewall]\nbackend = \"none\"\n";
        let cfg = RawConfig::from_toml(text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        let policy = Policy::from_config(&cfg).unwrap();
        let r = Router::new(cfg.listen, policy);
        let dns = Arc::new(Dns::new(&cfg, &r.policy()));
        let r = r.with_dns(Arc::clone(&dns));
        let name = |d: Decision| match d {
            Decision::Forward(c) => r.policy().name(c.index).to_string(),
            Decision::RefuseLoop => "loop".into(),
            Decision::RefuseFake => "unmapped".into(),
        };
        assert_eq!(name(decide(&r, Network::Tcp, "198.51.100.7:22")), "direct");
        let q = query(1, "ssh.via-proxy.example", TYPE_A);
        let answer = response(&q, &[Answer::A(None, "198.51.100.7".parse().unwrap(), 300)]);
        dns.on_reply(
            "192.0.2.2:5353".parse().unwrap(),
            "198.51.100.10:53".parse().unwrap(),
            &answer,
        );
        assert_eq!(name(decide(&r, Network::Tcp, "198.51.100.7:22")), "proxy");
        assert_eq!(name(decide(&r, Network::Udp, "198.51.100.7:4000")), "proxy");
        // Another address is not touched.
        assert_eq!(name(decide(&r, Network::Tcp, "198.51.100.8:22")), "direct");
        // A sniffed name wins over the learned one.
        let sniffed = FlowMeta {
            domain: Some("other.example"),
            ..FlowMeta::addresses(
                Network::Tcp,
                "192.0.2.2:40000".parse().unwrap(),
                "198.51.100.7:443".parse().unwrap(),
            )
        };
        assert_eq!(name(r.decide(&sniffed)), "direct");
    }

    /// A flow to a fake-ip address goes by the pool's name for it, before
    /// any rule on destination addresses (even one covering the fake
    /// range); one with no name is refused.
    #[test]
    fn fake_addresses_are_routed_by_name_and_unmapped_ones_refused() {
        use crate::dns::fakeip::FakePool;
        use crate::dns::message::build::query;
        use crate::dns::message::{answers, RecordData, TYPE_A};
        let text = "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
                    [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
                    [[outbounds]]\nname = \"deny\"\ntype = \"block\"\n\
                    [route]\nfinal = \"direct\"\n\
                    [[route.rules]]\ndst = [\"198.18.0.0/15\", \"10.0.0.0/8\"]\noutbound = \"deny\"\n\
                    [[route.rules]]\ndomain_suffix = [\"via-proxy.example\"]\noutbound = \"proxy\"\n\
                    [dns]\n[[dns.servers]]\nname = \"isp\"\naddress = \"udp://192.0.2.53\"\noutbound = \"direct\"\n\
                    [dns.fake_ip]\nranges = [\"198.18.0.0/15\"]\nstore = \"\"\n\
                    [firewall]\nbackend = \"none\"\n";
        let cfg = RawConfig::from_toml(text, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let policy = Policy::from_config(&cfg).unwrap();
        let pool = Arc::new(FakePool::new(cfg.dns.fake_ip.as_ref().unwrap()));
        pool.set_exclusions(Arc::clone(policy.fake_ip_exclusions().unwrap()));
        let r = Router::new(cfg.listen, policy).with_fake_ip(Arc::clone(&pool));
        let name = |d: Decision| match d {
            Decision::Forward(c) => r.policy().name(c.index).to_string(),
            Decision::RefuseLoop => "loop".into(),
            Decision::RefuseFake => "unmapped".into(),
        };
        let fake = |host: &str| -> String {
            let a = pool.answer(&query(1, host, TYPE_A)).expect("answered");
            match answers(&a).unwrap()[0].data {
                RecordData::Addr(ip) => ip.to_string(),
                _ => panic!("no address"),
            }
        };
        let proxied = fake("www.via-proxy.example");
        let other = fake("other.example");
        assert_eq!(
            name(decide(&r, Network::Tcp, &format!("{proxied}:443"))),
            "proxy"
        );
        assert_eq!(
            name(decide(&r, Network::Udp, &format!("{proxied}:443"))),
            "proxy"
        );
        // No domain rule for it: final, not the rule covering 198.18/15.
        assert_eq!(
            name(decide(&r, Network::Tcp, &format!("{other}:443"))),
            "direct"
        );
        // A sniffed name does not replace the pool's.
        let sniffed = FlowMeta {
            domain: Some("elsewhere.example"),
            ..FlowMeta::addresses(
                Network::Tcp,
                "192.0.2.2:40000".parse().unwrap(),
                format!("{proxied}:443").parse().unwrap(),
            )
        };
        assert_eq!(name(r.decide(&sniffed)), "proxy");
        // Unmapped, and the range's network address: refused.
        for dst in ["198.18.200.1:443", "198.18.0.0:80", "198.19.255.255:53"] {
            assert_eq!(name(decide(&r, Network::Tcp, dst)), "unmapped", "{dst}");
            assert_eq!(name(decide(&r, Network::Udp, dst)), "unmapped", "{dst}");
        }
        // Real addresses go by the rules as before.
        assert_eq!(name(decide(&r, Network::Tcp, "10.1.2.3:22")), "deny");
        assert_eq!(name(decide(&r, Network::Tcp, "203.0.113.9:22")), "direct");
        // The excluded names got no fake address (the real resolver's).
        assert!(pool.answer(&query(2, "pool.ntp.org", TYPE_A)).is_none());
    }
}
