//! The session table: sessions by client address:port, and per client
//! address how many it has and which never got a reply; and how room is
//! made in it for a new session.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;

use super::session::SessionShared;
use super::{held_back, UdpRelay};

/// A session in the table: `id` tells it from a later session of the
/// same client.
pub(super) struct SessionEntry {
    pub(super) id: u64,
    pub(super) shared: Arc<SessionShared>,
}

/// The session table: sessions by client address:port, and per client
/// address how many it has and which never got a reply.
///
/// Both maps change only when a session opens, ends or gets its first
/// reply, never per datagram.
#[derive(Default)]
pub(super) struct Table {
    pub(super) sessions: HashMap<SocketAddr, SessionEntry>,
    clients: HashMap<IpAddr, ClientSessions>,
}

#[derive(Default)]
struct ClientSessions {
    count: usize,
    /// Sessions that never got a reply, by id: ids grow, so the first is
    /// the oldest.
    unreplied: BTreeMap<u64, SocketAddr>,
}

impl Table {
    pub(super) fn insert(&mut self, client: SocketAddr, entry: SessionEntry) {
        let c = self.clients.entry(client.ip()).or_default();
        c.count += 1;
        c.unreplied.insert(entry.id, client);
        if let Some(old) = self.sessions.insert(client, entry) {
            // Callers remove a client's session before opening another;
            // keep the counts right should that ever change.
            self.forget(client, old.id);
        }
    }

    /// Takes `client`'s session out of the table.
    pub(super) fn remove(&mut self, client: SocketAddr) -> Option<SessionEntry> {
        let entry = self.sessions.remove(&client)?;
        self.forget(client, entry.id);
        Some(entry)
    }

    /// Takes `client`'s session out if it is still the one numbered `id`
    /// (a session that ended may have been replaced already).
    pub(super) fn remove_if(&mut self, client: SocketAddr, id: u64) -> Option<SessionEntry> {
        if self.sessions.get(&client)?.id == id {
            self.remove(client)
        } else {
            None
        }
    }

    fn forget(&mut self, client: SocketAddr, id: u64) {
        let ip = client.ip();
        if let Some(c) = self.clients.get_mut(&ip) {
            c.count = c.count.saturating_sub(1);
            c.unreplied.remove(&id);
            if c.count == 0 {
                self.clients.remove(&ip);
            }
        }
    }

    pub(super) fn replied(&mut self, client: SocketAddr, id: u64) {
        if let Some(c) = self.clients.get_mut(&client.ip()) {
            c.unreplied.remove(&id);
        }
    }

    pub(super) fn count_of(&self, ip: IpAddr) -> usize {
        self.clients.get(&ip).map_or(0, |c| c.count)
    }

    /// The oldest session of `ip` that never got a reply.
    pub(super) fn oldest_unreplied_of(&self, ip: IpAddr) -> Option<SocketAddr> {
        let c = self.clients.get(&ip)?;
        c.unreplied.values().next().copied()
    }

    /// The session to give up when the table is full: the oldest that
    /// never got a reply, of the client address with the most sessions
    /// (a flood's source, not the host that asked once).
    pub(super) fn oldest_unreplied(&self) -> Option<SocketAddr> {
        self.clients
            .values()
            .filter_map(|c| {
                let (id, addr) = c.unreplied.iter().next()?;
                Some((c.count, std::cmp::Reverse(*id), *addr))
            })
            .max()
            .map(|(_, _, addr)| addr)
    }
}

impl UdpRelay {
    /// Makes room in the table for a new session of `client`: within its
    /// address's limit and the table's, evicting the oldest session that
    /// never got a reply where one is needed. Returns false (and counts and
    /// warns) when no room can be made.
    pub(super) fn make_room(&self, table: &mut Table, client: SocketAddr) -> bool {
        let ip = client.ip();
        let limits = **self.limits.load();
        let per_client = limits.udp_sessions_per_client;
        if table.count_of(ip) >= per_client {
            let Some(victim) = table.oldest_unreplied_of(ip) else {
                let refused = self
                    .stats
                    .sessions_refused_client
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Some(n) = self.warnings.client_limit.check() {
                    warn!(
                        %client, limit = per_client, refused,
                        "UDP client {ip} has {per_client} sessions, its limit, all of them answered; its new ports are refused until some expire (raise limits.udp_sessions_per_client if this is normal load){}",
                        held_back(n)
                    );
                }
                return false;
            };
            if let Some(n) = self.warnings.evicting.check() {
                warn!(
                    %client, limit = per_client,
                    "UDP client {ip} is at its limit of {per_client} sessions; its oldest unanswered ones are closed to make room (limits.udp_sessions_per_client){}",
                    held_back(n)
                );
            }
            self.evict(table, victim);
        }
        if table.sessions.len() >= limits.udp_sessions {
            let Some(victim) = table.oldest_unreplied() else {
                let refused = self
                    .stats
                    .sessions_refused_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Some(n) = self.warnings.table_full.check() {
                    warn!(
                        %client, limit = limits.udp_sessions, refused,
                        "UDP session table full of answered sessions; new clients are refused until sessions expire (raise limits.udp_sessions if this is normal load){}",
                        held_back(n)
                    );
                }
                return false;
            };
            if let Some(n) = self.warnings.evicting.check() {
                warn!(
                    %client, limit = limits.udp_sessions, evicted = %victim,
                    "UDP session table full; the oldest unanswered session of the busiest client is closed to make room (limits.udp_sessions){}",
                    held_back(n)
                );
            }
            self.evict(table, victim);
        }
        true
    }

    /// Ends `victim`'s session: out of the table now, so its slot is free,
    /// and its task told to stop (closing its upstream socket or SOCKS5
    /// association).
    fn evict(&self, table: &mut Table, victim: SocketAddr) {
        if let Some(entry) = table.remove(victim) {
            self.stats.sessions_evicted.fetch_add(1, Ordering::Relaxed);
            // Stores a permit if the task is not waiting right now.
            entry.shared.evicted.notify_one();
        }
    }
}
