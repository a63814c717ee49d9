//! What a running server shares with whoever steers it (the API, SIGHUP):
//! the registry of flows, the policy new flows read, the configuration it
//! came from, and the reload that replaces them.
//!
//! A reload builds everything new before it changes anything: a file that
//! fails validation, a rule set that cannot be read or firewall rules the
//! kernel refuses leave the running configuration exactly as it was.
//! Then the policy is swapped in one atomic store: flows already decided
//! keep the outbound they have, new flows read the new policy.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinSet;
use tracing::info;

use crate::config::Config;
use crate::dns::listen::Listeners;
use crate::firewall::{self, Plan};
use crate::inbound::tcp::TcpContext;
use crate::outbound::group;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::relay::udp::UdpRelay;
use crate::route::Router;

/// Reads the configuration again: the file and the command-line flags
/// over it, validated. The error text names every problem.
pub type Loader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, the running configuration is unchanged: {0}")]
    Invalid(String),
    #[error(
        "reload refused, the running configuration is unchanged: {} can only change with a restart ({})",
        keys.join(", "), "stop tproxyd and start it again"
    )]
    NeedsRestart { keys: Vec<&'static str> },
    #[error("reload refused, the running configuration is unchanged: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("reload refused, the running configuration is unchanged: {0}")]
    Firewall(#[from] firewall::FirewallError),
    #[error("reload is not available: tproxyd was started without a way to read its configuration again")]
    NoLoader,
}

/// What a reload changed, for the log and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Top-level parts that differ from before (`route`, `outbounds`,
    /// `timeouts`, `limits`, `firewall`).
    pub changed: Vec<&'static str>,
    /// Outbounds kept as they were (their state, a selector's choice
    /// included), and those built anew.
    pub kept: usize,
    pub built: usize,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changed.is_empty() {
            return f.write_str("nothing changed");
        }
        write!(
            f,
            "changed: {}; outbounds kept: {}, built: {}",
            self.changed.join(", "),
            self.kept,
            self.built
        )
    }
}

/// The keys a running server cannot change: its sockets, threads and
/// identity, and the routing marks its installed rules carry.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |differs: bool, key: &'static str| {
        if differs {
            keys.push(key);
        }
    };
    check(old.listen != new.listen, "listen");
    // The API's own socket; its secret is read per request and may change.
    check(
        old.api.as_ref().map(|a| a.listen) != new.api.as_ref().map(|a| a.listen),
        "api.listen",
    );
    check(old.mode != new.mode, "mode");
    // The pool's addresses live as long as the process: its ranges and
    // store cannot change under clients holding them. Its exclusions can.
    let pool_keys = |c: &Config| {
        c.dns
            .fake_ip
            .as_ref()
            .map(|f| (f.ranges.clone(), f.ttl, f.store.clone(), f.save_interval))
    };
    check(
        pool_keys(old) != pool_keys(new),
        "dns.fake_ip (on/off, ranges, ttl, store, save_interval)",
    );
    check(old.mark != new.mark, "mark");
    check(old.tcp != new.tcp || old.udp != new.udp, "tcp/udp");
    check(old.user != new.user, "user");
    check(old.limits.threads != new.limits.threads, "limits.threads");
    check(
        old.limits.udp_reply_sockets != new.limits.udp_reply_sockets,
        "limits.udp_reply_sockets",
    );
    check(
        old.firewall.backend != new.firewall.backend,
        "firewall.backend",
    );
    check(
        old.firewall.route_mark != new.firewall.route_mark
            || old.firewall.route_table != new.firewall.route_table
            || old.firewall.rule_priority != new.firewall.rule_priority,
        "firewall.route_mark/route_table/rule_priority",
    );
    keys
}

/// The running server's shared state.
pub struct Live {
    pub registry: Arc<Registry>,
    pub router: Router,
    config: Mutex<Arc<Config>>,
    tcp: Option<Arc<TcpContext>>,
    udp: Option<Arc<UdpRelay>>,
    /// The rules installed now; None when the server installs none.
    plan: Mutex<Option<Plan>>,
    loader: Option<Loader>,
    /// One reload at a time: two at once could install rules out of order.
    reloading: tokio::sync::Mutex<()>,
    /// Failover groups' health checks, for the policy of the moment.
    health: Mutex<JoinSet<()>>,
    /// `dns.listen`, when tproxyd answers DNS; a reload rebinds what changed.
    dns_listeners: Mutex<Option<Listeners>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    pub(crate) fn new(
        registry: Arc<Registry>,
        router: Router,
        config: Config,
        tcp: Option<Arc<TcpContext>>,
        udp: Option<Arc<UdpRelay>>,
        plan: Option<Plan>,
        loader: Option<Loader>,
    ) -> Live {
        Live {
            registry,
            router,
            config: Mutex::new(Arc::new(config)),
            tcp,
            udp,
            plan: Mutex::new(plan),
            loader,
            reloading: tokio::sync::Mutex::new(()),
            health: Mutex::new(JoinSet::new()),
            dns_listeners: Mutex::new(None),
        }
    }

    /// A server's shared state without its sockets: no flow arrives, but
    /// the policy, the registry and reload work (the API's tests).
    #[cfg(test)]
    pub(crate) fn detached(
        config: Config,
        loader: Option<Loader>,
    ) -> Result<Live, crate::policy::PolicyError> {
        let policy = Policy::from_config(&config)?;
        let router = Router::new(config.listen, policy);
        let dns = Arc::new(crate::dns::Dns::new(&config, &router.policy()));
        let router = router.with_dns(dns);
        Ok(Live::new(
            Arc::new(Registry::new()),
            router,
            config,
            None,
            None,
            None,
            loader,
        ))
    }

    /// The configuration now running.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&lock(&self.config))
    }

    /// The firewall plan installed now (what the stop removes).
    pub fn plan(&self) -> Option<Plan> {
        lock(&self.plan).clone()
    }

    /// The UDP relay, when the server serves UDP.
    pub fn udp(&self) -> Option<&Arc<UdpRelay>> {
        self.udp.as_ref()
    }

    /// (Re)starts the health checks of the policy's failover groups and
    /// ends those of the policy before. Must run inside the runtime.
    pub(crate) fn start_health_checks(&self, policy: &Policy) {
        let mut health = lock(&self.health);
        health.abort_all();
        for named in policy.outbounds() {
            if let Some(watch) = group::failover_watch(Arc::clone(&named.outbound)) {
                health.spawn(watch);
            }
        }
    }

    pub(crate) fn stop_health_checks(&self) {
        lock(&self.health).abort_all();
    }

    pub(crate) fn set_dns_listeners(&self, listeners: Option<Listeners>) {
        *lock(&self.dns_listeners) = listeners;
    }

    /// Closes the `dns.listen` sockets (the stop).
    pub(crate) fn stop_dns_listeners(&self) {
        lock(&self.dns_listeners).take();
    }

    /// The addresses `dns.listen` is served on now (none when tproxyd does
    /// not answer DNS).
    pub fn dns_listen_addrs(&self) -> Vec<std::net::SocketAddr> {
        lock(&self.dns_listeners)
            .as_ref()
            .map(Listeners::addrs)
            .unwrap_or_default()
    }

    /// Reads the configuration again and applies it, or refuses it and
    /// changes nothing. Flows already running keep going on the outbound
    /// they have.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.reloading.lock().await;
        let loader = self.loader.as_ref().ok_or(ReloadError::NoLoader)?;
        let new = loader().map_err(ReloadError::Invalid)?;
        let old = self.config();
        let restart = restart_only_changes(&old, &new);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart { keys: restart });
        }
        let current = self.router.policy();
        let policy = Policy::from_config_keeping(&new, Some(&current))?;
        let kept = policy
            .outbounds()
            .iter()
            .filter(|n| current.outbounds().iter().any(|o| o.key == n.key))
            .count();
        let report = ReloadReport {
            changed: changed_parts(&old, &new),
            kept,
            built: policy.outbounds().len() - kept,
        };

        // New dns.listen addresses are bound before anything changes (a
        // port in use refuses the reload); the old ones close at the end.
        let dns_listen = match lock(&self.dns_listeners).as_ref() {
            Some(l) => Some(
                l.pending(&new.dns.listen)
                    .map_err(|e| ReloadError::Invalid(e.to_string()))?,
            ),
            None => None,
        };

        // The firewall first: if the kernel refuses the new rules, nothing
        // else has changed yet. The tools run on a blocking thread, never
        // on a relay thread.
        let installed = self.plan();
        if let Some(installed) = installed {
            let next = Plan::from_config(&new).load_bypass_sets(&new)?;
            if next != installed {
                // A refused plan leaves the installed rules in place (each
                // backend swaps its rules in one transaction per family and
                // puts the earlier ones back), and its error says so.
                apply_off_thread(next.clone()).await?;
                *lock(&self.plan) = Some(next);
            }
        }

        let policy = Arc::new(policy);
        if let Some(udp) = &self.udp {
            udp.set_timeouts_and_limits(new.timeouts, new.limits);
        }
        if let Some(tcp) = &self.tcp {
            tcp.idle_ms.store(
                new.timeouts.tcp_idle.as_millis().min(u64::MAX as u128) as u64,
                Ordering::Relaxed,
            );
            tcp.admission
                .set_limits(new.limits.tcp_flows, new.limits.tcp_connecting_per_client);
        }
        if let Some(dns) = self.router.dns() {
            dns.reconfigure(&new, &policy);
        }
        if let (Some(pool), Some(exclusions)) = (self.router.fake_ip(), policy.fake_ip_exclusions())
        {
            pool.set_exclusions(Arc::clone(exclusions));
        }
        self.router.set_policy(Arc::clone(&policy));
        if let Some(udp) = &self.udp {
            udp.policy_changed(&policy);
        }
        self.start_health_checks(&policy);
        if let (Some(pending), Some(l)) = (dns_listen, lock(&self.dns_listeners).as_mut()) {
            if let Err(e) = l.commit(pending) {
                tracing::warn!("dns.listen: cannot serve the new addresses: {e}");
            }
        }
        *lock(&self.config) = Arc::new(new);
        info!("configuration reloaded: {report}");
        Ok(report)
    }
}

/// Applies `plan` on a blocking thread: the firewall tools must never run
/// on a relay thread.
async fn apply_off_thread(plan: Plan) -> Result<(), ReloadError> {
    let runtime = tokio::runtime::Handle::current();
    match tokio::task::spawn_blocking(move || runtime.block_on(firewall::apply(&plan))).await {
        Ok(applied) => applied.map_err(ReloadError::from),
        Err(join) => Err(ReloadError::Invalid(format!(
            "applying the firewall rules failed: {join}"
        ))),
    }
}

fn changed_parts(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut parts = Vec::new();
    if old.outbounds != new.outbounds {
        parts.push("outbounds");
    }
    if old.route != new.route {
        parts.push("route");
    }
    if old.timeouts != new.timeouts {
        parts.push("timeouts");
    }
    if old.limits != new.limits {
        parts.push("limits");
    }
    if old.firewall != new.firewall {
        parts.push("firewall");
    }
    if old.dns != new.dns {
        parts.push("dns");
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn config(extra: &str) -> Config {
        RawConfig::from_toml(
            &format!("[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n{extra}"),
            "t",
        )
        .unwrap()
        .validate(&|_| None)
        .unwrap()
    }

    #[test]
    fn listen_mode_mark_and_threads_need_a_restart() {
        let old = config("");
        let mut new = old.clone();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.mark = old.mark + 1;
        new.limits.threads = old.limits.threads + 1;
        assert_eq!(
            restart_only_changes(&old, &new),
            ["listen", "mark", "limits.threads"]
        );
        let mut api = old.clone();
        api.api = Some(crate::config::ApiConfig {
            listen: crate::config::DEFAULT_API_LISTEN,
            secret: None,
        });
        assert_eq!(restart_only_changes(&old, &api), ["api.listen"]);
        let mut secret = api.clone();
        if let Some(a) = secret.api.as_mut() {
            a.secret = Some(crate::config::Secret::new("new"));
        }
        assert!(restart_only_changes(&api, &secret).is_empty());
        let mut rules_only = old.clone();
        rules_only.timeouts.tcp_idle *= 2;
        rules_only.limits.tcp_flows += 1;
        assert!(restart_only_changes(&old, &rules_only).is_empty());
        assert_eq!(changed_parts(&old, &rules_only), ["timeouts", "limits"]);
    }

    struct Echo;

    impl crate::dns::listen::Answer for Echo {
        async fn answer(&self, query: Vec<u8>, _: std::net::SocketAddr) -> Option<Vec<u8>> {
            crate::dns::message::empty_answer(&query).ok()
        }
    }

    fn dns_config(ports: &[u16]) -> Result<Config, String> {
        let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let text = format!(
            "[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n\
             [dns]\nlisten = [{}]\nfinal = \"up\"\n\
             [[dns.servers]]\nname = \"up\"\naddress = \"udp://192.0.2.53\"\n",
            listen.join(", ")
        );
        RawConfig::from_toml(&text, "t")
            .map_err(|e| e.to_string())?
            .validate(&|_| None)
            .map_err(|e| e.to_string())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn ask(s: &mut tokio::net::TcpStream, id: u16) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let q = crate::dns::message::build::query(id, "a.example", 1);
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(&q);
        s.write_all(&f).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m).await.unwrap();
        crate::dns::message::id(&m).unwrap()
    }

    #[tokio::test]
    async fn a_reload_rebinds_dns_listen_only_where_it_changed() {
        let (p1, p2) = (free_port(), free_port());
        let ports = Arc::new(Mutex::new(vec![p1]));
        let wanted = Arc::clone(&ports);
        let loader: Loader = Box::new(move || dns_config(&lock(&wanted)));
        let cfg = dns_config(&[p1]).unwrap();
        let bound = crate::dns::listen::Bound::bind_all(&cfg.dns.listen, 0).unwrap();
        // As the server starts them (server::start_dns_listeners), without
        // a server: this room must not import that one.
        let server = crate::dns::listen::DnsServer::new(
            Arc::new(Echo),
            crate::dns::listen::Limits::default(),
        );
        let listeners =
            Some(crate::dns::listen::Listeners::start(&server, &cfg.dns.listen, bound, 0).unwrap());
        let live = Live::detached(cfg, Some(loader)).unwrap();
        live.set_dns_listeners(listeners);
        let a1: std::net::SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
        let a2: std::net::SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
        assert_eq!(live.dns_listen_addrs(), [a1]);
        // A connection to the first address lives through reloads that keep it.
        let mut kept = tokio::net::TcpStream::connect(a1).await.unwrap();
        assert_eq!(ask(&mut kept, 1).await, 1);
        *lock(&ports) = vec![p1, p2];
        live.reload().await.unwrap();
        assert_eq!(live.dns_listen_addrs(), [a1, a2]);
        assert_eq!(ask(&mut kept, 2).await, 2);
        let mut second = tokio::net::TcpStream::connect(a2).await.unwrap();
        assert_eq!(ask(&mut second, 3).await, 3);
        // A port in use refuses the reload, naming it; nothing changes.
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p3 = taken.local_addr().unwrap().port();
        *lock(&ports) = vec![p1, p3];
        let e = live.reload().await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{p3}")) && e.contains("in use"),
            "{e}"
        );
        assert_eq!(live.dns_listen_addrs(), [a1, a2]);
        assert_eq!(ask(&mut second, 4).await, 4);
        // Dropped from the list: closed; the other stays.
        *lock(&ports) = vec![p2];
        live.reload().await.unwrap();
        assert_eq!(live.dns_listen_addrs(), [a2]);
        assert_eq!(ask(&mut second, 5).await, 5);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::net::TcpStream::connect(a1).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "{a1} still served");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        live.stop_dns_listeners();
        assert!(live.dns_listen_addrs().is_empty());
    }
}
