//! Who gets in: the TCP flow limits (`limits.tcp_flows`,
//! `limits.tcp_connecting_per_client`) checked once per accepted
//! connection, with guards that give the place back on drop, so no path
//! through a flow (error, reset, abort at stop) can leak a count.
//!
//! 5,000 connections to a blackholed address once held 10,000
//! descriptors and 15.6 MB for the whole connect timeout, and other
//! clients waited. Bounding connects in progress per client address makes
//! one host's flood its own problem; bounding all flows keeps the total
//! in reach of the descriptor limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{limit} TCP flows open, the most limits.tcp_flows allows")]
    Flows { limit: usize },
    #[error("{limit} connects from this client still in progress, the most limits.tcp_connecting_per_client allows")]
    ConnectingPerClient { limit: usize },
}

/// The counts behind the limits, shared by the accept loop and the flows.
#[derive(Debug)]
pub struct Admission {
    // Atomics: a reload changes them while connections are admitted.
    max_flows: AtomicUsize,
    max_connecting_per_client: AtomicUsize,
    flows: AtomicUsize,
    /// Connects in progress per client address. A mutex taken twice per
    /// flow (admit, connected), never per byte; entries at zero are
    /// removed, so it holds at most one entry per connecting client.
    connecting: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    pub fn new(max_flows: usize, max_connecting_per_client: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_flows: AtomicUsize::new(max_flows),
            max_connecting_per_client: AtomicUsize::new(max_connecting_per_client),
            flows: AtomicUsize::new(0),
            connecting: Mutex::new(HashMap::new()),
        })
    }

    /// New limits (a reload): they apply to the next connection; flows
    /// already over them go on.
    pub fn set_limits(&self, max_flows: usize, max_connecting_per_client: usize) {
        self.max_flows.store(max_flows, Ordering::Relaxed);
        self.max_connecting_per_client
            .store(max_connecting_per_client, Ordering::Relaxed);
    }

    /// Open flows now.
    pub fn flows(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    /// Connects in progress from `client` now.
    pub fn connecting(&self, client: IpAddr) -> usize {
        self.lock().get(&client).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A panic while holding it cannot leave the map half-updated
        // (each update is one insert or remove), so a poisoned lock is
        // still good.
        self.connecting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets one new connection from `client` in, or says which limit it
    /// would break. The ticket holds its places until dropped; the
    /// connect place goes back earlier, by [`Ticket::connected`].
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Ticket, Refusal> {
        let max_flows = self.max_flows.load(Ordering::Relaxed);
        if self.flows.fetch_add(1, Ordering::Relaxed) >= max_flows {
            self.flows.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Flows { limit: max_flows });
        }
        // From here the flow place is the ticket's; a refusal below
        // drops it and gives the place back.
        let mut ticket = Ticket {
            admission: Arc::clone(self),
            client,
            connecting: false,
        };
        let mut map = self.lock();
        let n = map.entry(client).or_insert(0);
        let max_connecting = self.max_connecting_per_client.load(Ordering::Relaxed);
        if *n >= max_connecting {
            if *n == 0 {
                map.remove(&client);
            }
            return Err(Refusal::ConnectingPerClient {
                limit: max_connecting,
            });
        }
        *n += 1;
        ticket.connecting = true;
        Ok(ticket)
    }
}

/// One admitted flow's places: in the flow count until dropped, in its
/// client's connect count until [`connected`](Ticket::connected) or drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    client: IpAddr,
    connecting: bool,
}

impl Ticket {
    /// The upstream answered (or failed): the connect is no longer in
    /// progress. Idempotent.
    pub fn connected(&mut self) {
        if !std::mem::take(&mut self.connecting) {
            return;
        }
        let mut map = self.admission.lock();
        if let Some(n) = map.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.connected();
        self.admission.flows.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connects_in_progress_are_bounded_per_client() {
        let adm = Admission::new(100, 2);
        let a = ip("192.0.2.2");
        let mut t1 = adm.admit(a).unwrap();
        let _t2 = adm.admit(a).unwrap();
        assert_eq!(
            adm.admit(a).unwrap_err(),
            Refusal::ConnectingPerClient { limit: 2 }
        );
        // Another client is not affected.
        let _other = adm.admit(ip("192.0.2.3")).unwrap();
        // Refusals took no place.
        assert_eq!(adm.flows(), 3);
        assert_eq!(adm.connecting(a), 2);
        // Once one connect is through, a new one may start.
        t1.connected();
        t1.connected();
        assert_eq!(adm.connecting(a), 1);
        let _t3 = adm.admit(a).unwrap();
        assert_eq!(adm.flows(), 4);
    }

    #[test]
    fn flows_are_bounded_and_places_come_back_on_drop() {
        let adm = Admission::new(3, 3);
        let tickets: Vec<Ticket> = ["192.0.2.2", "192.0.2.3", "2001:db8::1"]
            .iter()
            .map(|a| adm.admit(ip(a)).unwrap())
            .collect();
        assert_eq!(
            adm.admit(ip("192.0.2.4")).unwrap_err(),
            Refusal::Flows { limit: 3 }
        );
        drop(tickets);
        assert_eq!(adm.flows(), 0);
        assert!(adm.lock().is_empty(), "no entry left behind");
        let _t = adm.admit(ip("192.0.2.4")).unwrap();
    }

    #[test]
    fn a_zero_connect_limit_refuses_without_leaving_an_entry() {
        let adm = Admission::new(3, 0);
        assert!(adm.admit(ip("192.0.2.2")).is_err());
        assert_eq!(adm.flows(), 0);
        assert!(adm.lock().is_empty());
    }
}
