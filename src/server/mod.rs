//! Start-up and life of one tproxyd instance: check privileges, bind the
//! listeners, serve until told to stop.
//!
//! Binding is separate from serving so that a caller (the binary, later the
//! firewall set-up) knows the listeners exist before anything points
//! traffic at them.

use portable_atomic::AtomicU64;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tracing::{info, warn};

use crate::config::{Config, Mode};
use crate::dns::fakeip::FakePool;
use crate::dns::listen::{self, Answer, Bound, CapturedTcp, DnsServer, ListenError, Listeners};
use crate::dns::Dns;
use crate::fds;
use crate::firewall::{self, FirewallError, Plan};
use crate::inbound;
use crate::inbound::admission::Admission;
use crate::inbound::tcp::TcpContext;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::relay::udp::UdpRelay;
use crate::route::Router;
use crate::sys;

pub use crate::live::{restart_only_changes, Live, Loader, ReloadError, ReloadReport};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "tproxyd needs CAP_NET_ADMIN: it sets IP_TRANSPARENT on its listeners and SO_MARK on \
         its outbound sockets (the mark is what keeps it from capturing its own traffic); with \
         UDP it needs CAP_NET_BIND_SERVICE too (replies leave from ports like 53). Run it as \
         root, or grant both: setcap cap_net_admin,cap_net_bind_service+ep $(command -v tproxyd)"
    )]
    MissingCapability,
    #[error(
        "tproxyd serves UDP, and each reply leaves from the port the client wrote to (DNS: 53). \
         Ports below {start} (net.ipv4.ip_unprivileged_port_start) need CAP_NET_BIND_SERVICE, \
         which this process lacks, so every such reply would fail. Grant it with CAP_NET_ADMIN: \
         setcap cap_net_admin,cap_net_bind_service+ep $(command -v tproxyd) (systemd: \
         AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE), or run as root, or serve TCP \
         only (--tcp-only)"
    )]
    MissingBindService { start: u16 },
    #[error("cannot listen on {proto} {addr}: port {} is already in use by another program (see: ss -lntup 'sport = :{}'); stop it or choose another --listen port", addr.port(), addr.port())]
    AddrInUse {
        proto: &'static str,
        addr: SocketAddr,
    },
    #[error("cannot listen on {proto} {addr}: that address is not on this host; use [::] or an address of one of its interfaces")]
    AddrNotAvailable {
        proto: &'static str,
        addr: SocketAddr,
    },
    #[error(
        "cannot listen on {addr}: {ip} is not an address of this host. Transparent sockets may \
         bind it, but no captured flow would ever reach it; use [::]:{port} (IPv4 and IPv6), \
         0.0.0.0:{port}, 127.0.0.1:{port} or an address of one of its interfaces",
        ip = addr.ip(), port = addr.port()
    )]
    NotLocal { addr: SocketAddr },
    #[error("cannot listen on {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot listen on {addr} for the API (api.listen): {source}")]
    ApiBind { addr: SocketAddr, source: io::Error },
    #[error("{0}")]
    DnsListen(#[from] ListenError),
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cannot register the listener with the runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot remove the firewall rules: {0}")]
    RemoveRules(FirewallError),
}

fn bind_error(proto: &'static str, addr: SocketAddr, source: io::Error) -> StartError {
    match source.kind() {
        io::ErrorKind::AddrInUse => StartError::AddrInUse { proto, addr },
        io::ErrorKind::AddrNotAvailable => StartError::AddrNotAvailable { proto, addr },
        _ => match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => StartError::MissingCapability,
            _ => StartError::Bind {
                proto,
                addr,
                source,
            },
        },
    }
}

/// Sets up the descriptor budget ([`fds`]) from the soft open-files limit
/// and the descriptors open now (listeners, runtime), once the runtime
/// runs. Without a readable limit, accounting stays off and descriptor
/// exhaustion shows as EMFILE warnings instead.
fn init_descriptor_budget(tcp_flows: usize) {
    let (limit, open) = match (sys::nofile_limit(), sys::open_descriptors()) {
        (Ok(limit), Ok(open)) => (limit, open),
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot read the open-files limit or the descriptors in use ({e}); TCP connections are accepted without a descriptor budget");
            return;
        }
    };
    let budget = fds::global();
    budget.init(limit, open);
    if let Some(capacity) = budget.flow_capacity() {
        if capacity < tcp_flows {
            info!(
                open_files_limit = limit,
                in_use = open,
                reserve = budget.reserve(),
                "the open-files limit allows about {capacity} TCP flows at once, fewer than \
                 limits.tcp_flows ({tcp_flows}); beyond that new connections wait in the listen \
                 backlog"
            );
        }
    }
}

/// Whether serving `cfg` needs CAP_NET_BIND_SERVICE after start-up: UDP
/// replies leave from the port the client wrote to, so a reply socket
/// binds the remote's port. Only the captured destination ports matter;
/// no port list means every port.
pub fn needs_bind_service(cfg: &Config) -> bool {
    let lowest = cfg
        .firewall
        .udp_ports
        .iter()
        .map(|r| r.first)
        .min()
        .unwrap_or(1);
    cfg.udp && lowest < sys::unprivileged_port_start()
}

/// The capabilities tproxyd needs once its listeners are bound and its
/// rules installed: CAP_NET_ADMIN (transparent reply sockets, SO_MARK,
/// removing the rules) and, when [`needs_bind_service`], that one too.
pub fn capabilities_needed(cfg: &Config) -> sys::CapSet {
    if needs_bind_service(cfg) {
        sys::CapSet::NET_ADMIN.union(sys::CapSet::NET_BIND_SERVICE)
    } else {
        sys::CapSet::NET_ADMIN
    }
}

/// Listeners bound and ready to serve.
///
/// The server owns its whole life: [`bind`](Server::bind) the listeners,
/// [`install_rules`](Server::install_rules) (rules must never point at a
/// port nobody serves), then [`run`](Server::run): serve, and on the stop
/// drain the flows and remove the rules. The binary only puts the user
/// switch between the rules and the serving, where it must be.
pub struct Server {
    cfg: Config,
    tcp: Option<std::net::TcpListener>,
    udp: Option<std::net::UdpSocket>,
    /// The API's listener (`[api]`).
    api: Option<std::net::TcpListener>,
    /// `dns.listen`, UDP and TCP on each address.
    dns_listen: Vec<Bound>,
    plan: Option<Plan>,
    loader: Option<Loader>,
}

/// What the server's life ends with, for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesAtStop {
    /// No rules were installed (backend none, or none asked for).
    None,
    Removed,
    /// `fail_closed`: kept, captured traffic is dropped until a restart.
    Kept,
}

impl Server {
    /// Checks privileges and binds every listener the config asks for.
    pub fn bind(cfg: Config) -> Result<Self, StartError> {
        if !sys::has_cap_net_admin().unwrap_or(false) {
            return Err(StartError::MissingCapability);
        }
        if needs_bind_service(&cfg) && !sys::has_cap_net_bind_service().unwrap_or(false) {
            return Err(StartError::MissingBindService {
                start: sys::unprivileged_port_start(),
            });
        }
        match sys::raise_nofile_limit() {
            Ok(n) if n < 4096 => warn!("open-files limit is {n}; each TCP flow takes two descriptors, so a few hundred flows will reach it, and new connections then wait in the listen backlog. Raise it (LimitNOFILE= in the service unit, ulimit -n)"),
            Ok(_) => {}
            Err(e) => warn!("cannot raise the open-files limit: {e}"),
        }
        // IP_TRANSPARENT lets a listener bind an address the host does
        // not have; TPROXY then finds it only if the rules name it, and a
        // typo would silently capture into nothing.
        let listens = cfg.tcp || cfg.udp;
        if listens && !cfg.listen.ip().is_unspecified() && !sys::is_local_address(cfg.listen.ip()) {
            return Err(StartError::NotLocal { addr: cfg.listen });
        }
        let transparent = cfg.mode == Mode::Tproxy;
        let tcp = if cfg.tcp {
            let opts = sys::ListenOptions {
                transparent,
                recv_orig_dst: false,
                mark: cfg.mark,
            };
            Some(
                sys::tcp_listener(cfg.listen, opts)
                    .map_err(|e| bind_error("tcp", cfg.listen, e))?,
            )
        } else {
            None
        };
        let udp = if cfg.udp {
            let opts = sys::ListenOptions {
                transparent: true,
                recv_orig_dst: true,
                mark: cfg.mark,
            };
            Some(
                sys::udp_listener(cfg.listen, opts)
                    .map_err(|e| bind_error("udp", cfg.listen, e))?,
            )
        } else {
            None
        };
        // Bound with the others, before any rule is installed: a port
        // already taken ends the start here, with nothing to undo.
        let api = match &cfg.api {
            Some(api) => Some(std::net::TcpListener::bind(api.listen).map_err(|source| {
                StartError::ApiBind {
                    addr: api.listen,
                    source,
                }
            })?),
            None => None,
        };
        // Here too, and before privileges are dropped: a port below 1024
        // needs them.
        let dns_listen = Bound::bind_all(&cfg.dns.listen, cfg.mark)?;
        Ok(Server {
            cfg,
            tcp,
            udp,
            api,
            dns_listen,
            plan: None,
            loader: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// How a reload (SIGHUP, the API) reads the configuration again.
    pub fn with_loader(mut self, loader: Loader) -> Self {
        self.loader = Some(loader);
        self
    }

    /// Installs `plan`'s rules and routes; the server removes them when
    /// it stops (unless `fail_closed`) and replaces them on reload. On
    /// failure nothing is left installed.
    pub async fn install_rules(&mut self, plan: Plan) -> Result<(), FirewallError> {
        firewall::apply(&plan).await?;
        self.plan = Some(plan);
        Ok(())
    }

    /// The rules installed now, if any.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Removes the installed rules, for a start that fails after
    /// [`install_rules`](Server::install_rules) (the user switch).
    pub async fn remove_rules(&mut self) -> Result<(), FirewallError> {
        match self.plan.take() {
            Some(plan) => firewall::remove(&plan).await,
            None => Ok(()),
        }
    }

    /// Serves until `shutdown` resolves, reloading on each message from
    /// `reloads`; then drains the flows and removes the rules. Must run
    /// inside a Tokio runtime.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        reloads: tokio::sync::mpsc::Receiver<()>,
    ) -> Result<RulesAtStop, StartError> {
        self.run_with(shutdown, reloads, |_| {}).await
    }

    /// [`run`](Server::run), handing the running server's shared state to
    /// `started` once it serves (the tests steer it through that).
    pub async fn run_with(
        self,
        shutdown: impl Future<Output = ()>,
        mut reloads: tokio::sync::mpsc::Receiver<()>,
        started: impl FnOnce(Arc<Live>),
    ) -> Result<RulesAtStop, StartError> {
        // Whatever fails before serving takes the rules away with it:
        // they would capture traffic into a listener that never serves.
        let policy = match Policy::from_config(&self.cfg) {
            Ok(p) => p,
            Err(e) => {
                if let Some(plan) = &self.plan {
                    let _ = firewall::remove(plan).await;
                }
                return Err(StartError::Policy(e));
            }
        };
        let cfg = self.cfg;
        let router = Router::new(cfg.listen, policy);
        let policy = router.policy();
        let dns = Arc::new(Dns::new(&cfg, &policy));
        let fake = cfg.dns.fake_ip.as_ref().map(|f| {
            let pool = Arc::new(FakePool::new(f));
            if let Some(exclusions) = policy.fake_ip_exclusions() {
                pool.set_exclusions(Arc::clone(exclusions));
            }
            pool.restore();
            dns.set_fake_ip(Arc::clone(&pool));
            pool
        });
        drop(policy);
        let mut router = router.with_dns(Arc::clone(&dns));
        if let Some(pool) = &fake {
            router = router.with_fake_ip(Arc::clone(pool));
        }
        let registry = Arc::new(Registry::new());
        let mut tasks = tokio::task::JoinSet::new();
        let (stop_tcp, tcp_stop) = tokio::sync::watch::channel(false);
        let mut tcp_task = None;
        let mut tcp_ctx = None;
        let mut tcp_ctx_for_dns: Option<Arc<TcpContext>> = None;
        let mut udp_relay = None;

        if let Some(l) = self.tcp {
            let listener = TcpListener::from_std(l).map_err(StartError::Runtime)?;
            init_descriptor_budget(cfg.limits.tcp_flows);
            let ctx = Arc::new(TcpContext {
                mode: cfg.mode,
                router: router.clone(),
                idle_ms: AtomicU64::new(
                    cfg.timeouts.tcp_idle.as_millis().min(u64::MAX as u128) as u64
                ),
                admission: Admission::new(
                    cfg.limits.tcp_flows,
                    cfg.limits.tcp_connecting_per_client,
                ),
                registry: Arc::clone(&registry),
                dns: arc_swap::ArcSwapOption::empty(),
            });
            tcp_ctx = Some(Arc::clone(&ctx));
            tcp_ctx_for_dns = Some(Arc::clone(&ctx));
            tcp_task = Some(tokio::spawn(inbound::tcp::serve(listener, ctx, tcp_stop)));
        }
        if let Some(s) = self.udp {
            let socket = UdpSocket::from_std(s).map_err(StartError::Runtime)?;
            let relay = UdpRelay::new(
                router.clone(),
                cfg.timeouts,
                cfg.limits,
                cfg.mark,
                Arc::clone(&registry),
            );
            let sweeper = Arc::clone(&relay);
            let idle = cfg.timeouts.udp_idle;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(15).min(idle));
                loop {
                    tick.tick().await;
                    sweeper.replies.expire(idle);
                }
            });
            udp_relay = Some(Arc::clone(&relay));
            tasks.spawn(inbound::udp::serve(socket, relay));
            for named in router.policy().outbounds() {
                let probe = Arc::clone(&dns).probe_udp(
                    named.key,
                    named.name.to_string(),
                    Arc::clone(&named.outbound),
                );
                tasks.spawn(probe);
            }
        }
        // The fake-ip pool, saved when it changed, every save_interval.
        if let (Some(pool), Some(f)) = (&fake, &cfg.dns.fake_ip) {
            let pool = Arc::clone(pool);
            let every = Duration::from_secs(u64::from(f.save_interval.max(1)));
            tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    let pool = Arc::clone(&pool);
                    let _ = tokio::task::spawn_blocking(move || pool.save_if_changed(false)).await;
                }
            });
        }
        // Byte totals and the rate, once a second (the metrics and the
        // API's traffic stream read them).
        let ticking = Arc::clone(&registry);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                ticking.tick();
            }
        });

        let protocols = match (cfg.tcp, cfg.udp) {
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            (false, true) => "udp",
            (false, false) => "none (DNS on dns.listen only)",
        };
        let upstream = describe_outbounds(&cfg);
        info!(listen = %cfg.listen, mode = %cfg.mode, protocols, outbound = %upstream, mark = cfg.mark, threads = cfg.limits.threads, "tproxyd listening");

        // An unreachable upstream at start is worth a warning, not a refusal
        // to start: flows fail fast (reset) until it is back.
        let policy = router.policy();
        for named in policy.outbounds() {
            let probe = Arc::clone(&named.outbound);
            let name = named.name.clone();
            tasks.spawn(async move {
                if let Err(e) = probe.probe().await {
                    warn!(outbound = %name, "upstream not reachable at start: {e}; flows through it will be reset until it is back");
                }
            });
        }
        let fail_closed = cfg.firewall.fail_closed;
        let live = Arc::new(Live::new(
            Arc::clone(&registry),
            router.clone(),
            cfg,
            tcp_ctx,
            udp_relay,
            self.plan,
            self.loader,
        ));
        // Failover groups check their members for as long as the server
        // runs; a reload restarts them for its policy.
        live.start_health_checks(&policy);
        drop(policy);
        // The API stops with the server: the accept loop is aborted with
        // the other tasks, and its streams end when `api_stop` turns.
        let (api_stop, api_stopped) = tokio::sync::watch::channel(false);
        #[cfg(not(feature = "api"))]
        // Config::validate refuses `[api]` in a build without the API, so
        // there is never a listener here.
        let _ = (self.api, api_stopped);
        #[cfg(feature = "api")]
        if let Some(listener) = self.api {
            let serving = crate::api::serve(listener, Arc::clone(&live), api_stopped);
            tasks.spawn(async move {
                if let Err(e) = serving.await {
                    warn!("{e}");
                }
            });
        }
        // Dns answers through whatever resolver the configuration of the
        // moment has; the listeners (even none yet: a reload may add some)
        // and the captured port-53 hook follow it.
        let dns_listeners = start_dns_listeners(
            Some(Arc::clone(&dns)),
            &live.config(),
            self.dns_listen,
            tcp_ctx_for_dns.as_deref(),
        )?;
        live.set_dns_listeners(dns_listeners);
        started(Arc::clone(&live));

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(()) = reloads.recv() => {
                    if let Err(e) = live.reload().await {
                        warn!("{e}");
                    }
                }
            }
        }
        info!("tproxyd stopping");
        // The fake-ip pool first, before anything slow (draining flows,
        // removing rules): procd and systemd kill a daemon a few seconds
        // after SIGTERM, and a pool lost makes every client's fake address
        // useless until it resolves again.
        if let Some(pool) = fake {
            let _ = tokio::task::spawn_blocking(move || pool.save_if_changed(true)).await;
        }
        let _ = api_stop.send(true);
        live.stop_dns_listeners();
        // TCP flows are reset before the rules go, so that no socket still
        // needs them once they are removed.
        let _ = stop_tcp.send(true);
        if let Some(task) = tcp_task {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("TCP flows did not end within 5 s of the stop");
            }
        }
        tasks.abort_all();
        live.stop_health_checks();
        let plan = live.plan();
        let rules = match plan {
            None => RulesAtStop::None,
            Some(p) if p.backend == crate::config::Backend::None => RulesAtStop::None,
            Some(_) if fail_closed => RulesAtStop::Kept,
            Some(p) => {
                firewall::remove(&p)
                    .await
                    .map_err(StartError::RemoveRules)?;
                RulesAtStop::Removed
            }
        };
        Ok(rules)
    }
}

/// Serves `dns.listen` (the sockets `bound` at start) and captured TCP
/// port 53 (while `answerer.ready()`) with `answerer`. Without one the
/// sockets are closed again, with a warning: nothing would answer what
/// arrives on them.
pub fn start_dns_listeners<A: Answer>(
    answerer: Option<Arc<A>>,
    cfg: &Config,
    bound: Vec<Bound>,
    tcp: Option<&TcpContext>,
) -> Result<Option<Listeners>, StartError> {
    let answerer = match answerer {
        Some(a) => a,
        None => {
            if !bound.is_empty() {
                warn!(
                    "dns.listen is set, but nothing answers DNS; the DNS \
                     listeners are not started"
                );
            }
            return Ok(None);
        }
    };
    let server = DnsServer::new(answerer, listen::Limits::default());
    if let Some(tcp) = tcp {
        tcp.dns.store(Some(Arc::new(CapturedTcp::new(&server))));
    }
    let listeners =
        Listeners::start(&server, &cfg.dns.listen, bound, cfg.mark).map_err(StartError::Runtime)?;
    Ok(Some(listeners))
}

/// The outbounds as one log field: `proxy=socks5 203.0.113.2:1080 (final)`.
fn describe_outbounds(cfg: &Config) -> String {
    cfg.outbounds
        .iter()
        .map(|o| {
            let what = o.kind.describe();
            let last = if o.name == cfg.route.final_outbound {
                " (final)"
            } else {
                ""
            };
            format!("{}={what}{last}", o.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
