//! The route decision: given a flow's client and original destination,
//! refuse it or pick the outbound that carries it.
//!
//! Today there is one outbound per instance; the decision already refuses
//! flows that would loop back into the listener, the one check every
//! flow must pass whatever the outbound.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::outbound::Outbound;
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What the route decision says about one flow.
#[derive(Debug)]
pub enum Decision {
    Forward(Arc<Outbound>),
    /// The original destination is tproxyd's own listener: forwarding it
    /// would connect to ourselves, forever.
    RefuseLoop,
}

#[derive(Debug, Clone)]
pub struct Router {
    listen: SocketAddr,
    outbound: Arc<Outbound>,
}

impl Router {
    pub fn new(listen: SocketAddr, outbound: Outbound) -> Self {
        Router {
            listen: sys::normalize(listen),
            outbound: Arc::new(outbound),
        }
    }

    pub fn decide(&self, _proto: Protocol, dst: SocketAddr) -> Decision {
        if self.is_listener(dst) {
            Decision::RefuseLoop
        } else {
            Decision::Forward(Arc::clone(&self.outbound))
        }
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
    use std::time::Duration;

    fn router(listen: &str) -> Router {
        Router::new(
            listen.parse().unwrap(),
            Outbound::Direct {
                mark: 1,
                connect_timeout: Duration::from_secs(1),
            },
        )
    }

    #[test]
    fn flows_to_the_listener_itself_are_refused() {
        let r = router("[::]:1090");
        assert!(matches!(
            r.decide(Protocol::Tcp, "127.0.0.1:1090".parse().unwrap()),
            Decision::RefuseLoop
        ));
        assert!(matches!(
            r.decide(Protocol::Udp, "[::1]:1090".parse().unwrap()),
            Decision::RefuseLoop
        ));
        assert!(matches!(
            r.decide(Protocol::Tcp, "[::ffff:127.0.0.1]:1090".parse().unwrap()),
            Decision::RefuseLoop
        ));
        // The same port on a remote host is an ordinary flow.
        assert!(matches!(
            r.decide(Protocol::Tcp, "198.51.100.1:1090".parse().unwrap()),
            Decision::Forward(_)
        ));
        assert!(matches!(
            r.decide(Protocol::Tcp, "127.0.0.1:80".parse().unwrap()),
            Decision::Forward(_)
        ));

        let specific = router("127.0.0.1:1090");
        assert!(matches!(
            specific.decide(Protocol::Tcp, "127.0.0.1:1090".parse().unwrap()),
            Decision::RefuseLoop
        ));
        assert!(matches!(
            specific.decide(Protocol::Tcp, "127.0.0.2:1090".parse().unwrap()),
            Decision::Forward(_)
        ));
    }
}
