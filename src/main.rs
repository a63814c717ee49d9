//! The `tproxyd` command line: the edge where library errors become
//! messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::net::SocketAddr;

use tproxyd::cidr::Cidr;
use tproxyd::config::{de, Backend, Config, ConfigError, Mode, RawConfig};
use tproxyd::firewall::{self, Plan};
use tproxyd::outbound::{self, RawOutbound};
use tproxyd::policy::Policy;
use tproxyd::server::{RulesAtStop, Server};

#[derive(Parser)]
#[command(
    name = "tproxyd",
    version,
    about = "Transparent proxy for Linux: REDIRECT and TPROXY, TCP and UDP, to SOCKS5 or direct"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (from a config file, or from the quick-start flags).
    Run {
        #[command(flatten)]
        args: RunArgs,
        /// Once the listeners are bound and the rules installed, run as
        /// this user (name or UID from /etc/passwd, or UID:GID) keeping
        /// only CAP_NET_ADMIN (and CAP_NET_BIND_SERVICE for UDP); overrides
        /// `user` in the config file.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// Validate a config file: exit 0 if valid, else print each problem and exit 2.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show tproxyd at work in throw-away network namespaces (as root);
    /// removes everything afterwards, also on Ctrl-C.
    Demo {
        /// Wait for Ctrl-C before removing everything, to look around.
        #[arg(long)]
        hold: bool,
    },
    /// Build or remove the LAN/router/WAN namespaces of the tests and the
    /// benchmark (as root); for bench/bench.py. Only in a build with the
    /// `testbed` feature (the tests' and bench/run's).
    #[cfg(feature = "testbed")]
    #[command(hide = true)]
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
    /// Check the system for what tproxyd needs (kernel support, sysctls,
    /// rules, routes, listener); exit 1 if anything FAILs.
    Doctor {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Show, install or remove tproxyd's firewall rules and policy routes
    /// by hand (for scripts); takes the same settings as run.
    Rules {
        #[arg(value_enum)]
        action: RulesAction,
        #[command(flatten)]
        args: RunArgs,
    },
}

#[cfg(feature = "testbed")]
#[derive(Subcommand)]
enum TestbedAction {
    /// Build PREFIX-lan, PREFIX-rtr and PREFIX-wan and leave them up.
    Up {
        #[arg(long)]
        prefix: String,
        /// Sysctls for connection-rate loads in every namespace (wide port
        /// range, tcp_tw_reuse, large backlogs).
        #[arg(long)]
        bench: bool,
        /// Also start dante in the WAN namespace, its files in DIR, and
        /// wait until it listens.
        #[arg(long, value_name = "DIR")]
        dante: Option<PathBuf>,
        /// Print the namespaces and addresses as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Kill what runs in the bed's namespaces and delete them.
    Down {
        #[arg(long)]
        prefix: String,
    },
}

#[cfg(feature = "testbed")]
fn testbed(action: TestbedAction) -> anyhow::Result<ExitCode> {
    use tproxyd::testbed::{self, Bed, Options};
    match action {
        TestbedAction::Up {
            prefix,
            bench,
            dante,
            json,
        } => {
            let bed = Bed::up(&prefix, &Options { bench })?;
            if let Some(dir) = dante {
                std::fs::create_dir_all(&dir)?;
                // Runs on in the namespace after we exit; `down` kills it.
                testbed::spawn_dante(&bed.wan, &dir, false)?;
                let socks = testbed::socks_v4();
                if !bed
                    .wan
                    .wait_tcp(socks, std::time::Duration::from_secs(10))?
                {
                    anyhow::bail!(
                        "dante did not start listening on {socks}; see {}",
                        dir.display()
                    );
                }
            }
            if json {
                println!("{}", bed.json());
            } else {
                println!(
                    "test bed up: {} {} {}",
                    bed.lan.name(),
                    bed.router.name(),
                    bed.wan.name()
                );
            }
            bed.keep();
        }
        TestbedAction::Down { prefix } => testbed::teardown(&prefix)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RulesAction {
    /// Print exactly what would be applied.
    Print,
    /// Install (replacing any earlier tproxyd rules).
    Apply,
    /// Remove tproxyd's rules and routes (and nothing else).
    Remove,
}

#[derive(Args)]
struct RunArgs {
    /// Read settings from this TOML file (see examples/tproxyd.toml).
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "mode", "socks5", "direct", "username", "mark", "tcp_only", "udp_only", "udp_timeout", "threads", "firewall", "lan_interface", "proxy_local", "bypass"])]
    config: Option<PathBuf>,
    /// Listen address; [::]:PORT serves IPv4 and IPv6.
    #[arg(long, value_name = "ADDR", value_parser = parse_host_port)]
    listen: Option<SocketAddr>,
    /// How flows are captured: tproxy (TCP+UDP) or redirect (TCP only).
    #[arg(long, value_enum)]
    mode: Option<CliMode>,
    /// The upstream as a URL: socks5://[USER:PASSWORD@]IP:PORT (socks5h:// sends
    /// sniffed names), http://[USER:PASSWORD@]IP:PORT. With a password, prefer the
    /// environment variable so it stays out of `ps`.
    #[arg(long, value_name = "URL", env = UPSTREAM_ENV, hide_env_values = true, conflicts_with_all = ["socks5", "direct"])]
    upstream: Option<String>,
    /// Upstream SOCKS5 server as IP:PORT.
    #[arg(long, value_name = "IP:PORT", conflicts_with = "direct", value_parser = parse_host_port)]
    socks5: Option<SocketAddr>,
    /// Send flows straight to their destination instead of through a proxy.
    #[arg(long)]
    direct: bool,
    /// SOCKS5 username (RFC 1929).
    #[arg(long, env = "TPROXYD_USERNAME", requires = "socks5")]
    username: Option<String>,
    /// SOCKS5 password; prefer the environment variable so it stays out of `ps`.
    #[arg(long, env = "TPROXYD_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// SO_MARK on tproxyd's own sockets (decimal or 0x hex); the firewall
    /// rules must skip it.
    #[arg(long, value_name = "N", value_parser = de::parse_mark)]
    mark: Option<u32>,
    /// Serve TCP only.
    #[arg(long, conflicts_with = "udp_only")]
    tcp_only: bool,
    /// Serve UDP only.
    #[arg(long)]
    udp_only: bool,
    /// Seconds a UDP session may stay idle.
    #[arg(long, value_name = "SECS")]
    udp_timeout: Option<u64>,
    /// Relay threads (default: half the cores, at least 1).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Who installs the capture rules (none: you write them).
    #[arg(long, value_enum)]
    firewall: Option<CliBackend>,
    /// Capture traffic arriving on this interface (repeatable; eth* allowed).
    #[arg(long, value_name = "IF")]
    lan_interface: Vec<String>,
    /// Capture the router's own traffic too.
    #[arg(long)]
    proxy_local: bool,
    /// Never capture this destination (repeatable), on top of the defaults.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    bypass: Vec<Cidr>,
    /// Log one line per flow (debug level).
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliBackend {
    Nftables,
    Iptables,
    None,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliMode {
    Tproxy,
    Redirect,
}

impl RunArgs {
    /// The quick-start flags as the same raw config a file would give;
    /// an `--upstream` URL that cannot be read is the one error.
    fn to_raw(&self) -> Result<RawConfig, ConfigError> {
        let mut raw = RawConfig {
            listen: self.listen,
            mode: self.mode.map(|m| match m {
                CliMode::Tproxy => Mode::Tproxy,
                CliMode::Redirect => Mode::Redirect,
            }),
            mark: self.mark,
            ..RawConfig::default()
        };
        if self.tcp_only {
            raw.tcp = Some(true);
            raw.udp = Some(false);
        }
        if self.udp_only {
            raw.tcp = Some(false);
            raw.udp = Some(true);
        }
        if self.direct {
            raw.outbound = Some(RawOutbound::Direct(outbound::direct::Raw::default()));
        }
        if let Some(url) = &self.upstream {
            // The message never quotes the URL: it may hold a password.
            let outbound = RawOutbound::from_url(url).map_err(|e| {
                ConfigError::Invalid(vec![tproxyd::config::ConfigIssue {
                    key: "--upstream".into(),
                    message: e.to_string(),
                }])
            })?;
            raw.outbound = Some(outbound);
        }
        if let Some(server) = self.socks5 {
            raw.outbound = Some(RawOutbound::Socks5(outbound::socks5::Raw {
                name: None,
                server,
                username: self.username.clone(),
                password: self.password.clone(),
                password_env: None,
                send_domain: false,
                dns_over_tcp: false,
            }));
        }
        raw.timeouts.udp_idle = self.udp_timeout;
        raw.limits.threads = self.threads;
        raw.firewall.backend = self.firewall.map(|b| match b {
            CliBackend::Nftables => Backend::Nftables,
            CliBackend::Iptables => Backend::Iptables,
            CliBackend::None => Backend::None,
        });
        if !self.lan_interface.is_empty() {
            raw.firewall.lan_interfaces = Some(self.lan_interface.clone());
        }
        if self.proxy_local {
            raw.firewall.proxy_local = Some(true);
        }
        if !self.bypass.is_empty() {
            raw.firewall.bypass = Some(self.bypass.clone());
        }
        Ok(raw)
    }

    /// Says so when the `--upstream` URL on the command line holds a
    /// secret (a user part: a password, a key), which `ps` shows to every
    /// user; from the environment it is fine.
    fn warn_of_a_secret_in_argv(&self) {
        let Some(url) = &self.upstream else { return };
        let from_env = std::env::var(UPSTREAM_ENV).is_ok_and(|v| v == *url);
        let has_secret = outbound::url::split(url).is_ok_and(|p| p.userinfo.is_some());
        if has_secret && !from_env {
            eprintln!(
                "warning: the --upstream URL holds a login or key, which `ps` shows to every \
                 user: pass the URL in the environment instead ({UPSTREAM_ENV}=URL tproxyd run …)"
            );
        }
    }
}

/// The environment variable `--upstream` is read from.
const UPSTREAM_ENV: &str = "TPROXYD_UPSTREAM";

fn parse_host_port(text: &str) -> Result<SocketAddr, String> {
    text.parse::<de::HostPort>().map(|h| h.0)
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    text.parse()
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn print_config_error(e: &ConfigError) {
    match e {
        ConfigError::Invalid(issues) => {
            for i in issues {
                eprintln!("error: {i}");
            }
        }
        other => eprintln!("error: {other}"),
    }
}

fn load(args: &RunArgs) -> Result<Config, ConfigError> {
    let raw = match &args.config {
        // Checked here, not by clap: clap would name only the flag when
        // the URL came from the environment.
        Some(_) if args.upstream.is_some() => {
            return Err(ConfigError::Invalid(vec![tproxyd::config::ConfigIssue {
                key: "--upstream".into(),
                message: format!(
                    "cannot be used with -c FILE (it comes from --upstream or {UPSTREAM_ENV}): \
                     put the outbound in the file, or leave out -c"
                ),
            }]))
        }
        Some(path) => RawConfig::load(path)?,
        None => {
            args.warn_of_a_secret_in_argv();
            let raw = args.to_raw()?;
            if raw.outbound.is_none() {
                return Err(ConfigError::Invalid(vec![tproxyd::config::ConfigIssue {
                    key: "outbound".into(),
                    message: "choose where flows go: --upstream URL, --socks5 IP:PORT or \
                              --direct (or -c FILE)"
                        .into(),
                }]));
            }
            raw
        }
    };
    let cfg = raw.validate(&env_var)?;
    tproxyd::dns::check_system_servers(&cfg)?;
    Ok(cfg)
}

/// The config, or the problems printed and the exit code 2 that says so.
fn load_or_report(args: &RunArgs) -> Result<Config, ExitCode> {
    load(args).map_err(|e| {
        print_config_error(&e);
        ExitCode::from(2)
    })
}

fn init_logging(verbose: bool) {
    let level = if verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // The API's /logs stream sees what stderr sees, at the same level:
    // asking it for debug lines does not make the data path log more.
    #[cfg(feature = "api")]
    tproxyd::api::logs::hub().set_level(level);
    let logs = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::from_level(level))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false),
        );
    #[cfg(feature = "api")]
    let logs = logs.with(tproxyd::api::logs::Layer);
    logs.init();
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); SIGHUP asks for a reload
/// through `reload` (its default action would kill tproxyd without
/// removing its rules, and with nftables captured traffic would then leak
/// out directly).
///
/// The handlers are installed when this is called, not when the future is
/// first polled, so that no signal in between can kill tproxyd with its
/// rules in place. Must be called inside the runtime.
fn stop_signal(
    reload: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot catch SIGHUP")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    // One waiting is enough: it reads the file as it is then.
                    let _ = reload.try_send(());
                }
            }
        }
    })
}

/// The relay's runtime: a pool of `threads` workers (one worker measured
/// the same as a current-thread runtime, so there is one code path).
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A runtime on the calling thread only: for installing the rules before
/// the user switch, which must happen while tproxyd has one thread.
fn single_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(args: RunArgs, user: Option<String>) -> anyhow::Result<ExitCode> {
    init_logging(args.verbose);
    let mut cfg = match load_or_report(&args) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if user.is_some() {
        cfg.user = user;
    }
    // Before anything is bound or installed: an unknown user ends here.
    let account = cfg
        .user
        .as_deref()
        .map(tproxyd::sys::lookup_account)
        .transpose()?;
    if cfg.mode == Mode::Redirect {
        tracing::info!("mode redirect serves TCP only; UDP needs --mode tproxy");
    }
    let plan = Plan::from_config(&cfg).load_bypass_sets(&cfg)?;
    let threads = cfg.limits.threads;
    let keep = tproxyd::server::capabilities_needed(&cfg);
    // A reload reads the same file with the same flags over it.
    let reload_user = cfg.user.clone();
    let loader: tproxyd::server::Loader = Box::new(move || {
        let mut cfg = load(&args).map_err(|e| e.to_string())?;
        if reload_user.is_some() {
            cfg.user = reload_user.clone();
        }
        Ok(cfg)
    });
    // Listeners first: rules must never point at a port nobody serves.
    let mut server = Server::bind(cfg)?.with_loader(loader);
    // From here until the relay's runtime has its handlers in place, a stop
    // signal waits, blocked, instead of killing tproxyd with its rules
    // installed. The handlers can only come after the user switch (which
    // needs a single thread, and the relay's runtime starts threads); a
    // signal sent in between is delivered then, not lost.
    tproxyd::sys::block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    let backend = plan.backend;
    let captures = plan.captures();
    single_thread_runtime()?
        .block_on(server.install_rules(plan))
        .context("cannot install the firewall rules")?;
    if backend != Backend::None && captures {
        tracing::info!(%backend, "firewall rules and policy routes installed");
    } else if backend != Backend::None {
        tracing::info!(%backend, "tcp and udp are off: no firewall rules installed (a DNS forwarder on dns.listen only)");
    }
    let undo = |server: &mut Server| {
        if let Err(e) = single_thread_runtime().and_then(|rt| {
            rt.block_on(server.remove_rules())
                .context("cannot remove the firewall rules")
        }) {
            tracing::error!("{e:#}");
        }
    };
    if let Some(account) = &account {
        if let Err(e) = tproxyd::sys::switch_user(account, keep) {
            undo(&mut server);
            return Err(e.into());
        }
        tracing::info!(
            "running as user {} (uid {}, gid {}) with {keep} only",
            account.name,
            account.uid,
            account.gid
        );
    }
    let runtime = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            undo(&mut server);
            return Err(e);
        }
    };
    let at_stop = runtime.block_on(async {
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let stop = match stop_signal(reload) {
            Ok(stop) => stop,
            Err(e) => {
                let _ = server.remove_rules().await;
                return Err(e);
            }
        };
        tproxyd::sys::unblock_termination_signals().context("cannot unblock SIGINT/SIGTERM")?;
        if let Some(plan) = server.plan() {
            log_capture_caveats(plan, server.config().listen);
        }
        Ok(server.run(stop, reloads).await?)
    })?;
    match at_stop {
        RulesAtStop::Kept => tracing::info!("fail_closed: rules kept; captured traffic is dropped until tproxyd runs again or `tproxyd rules remove`"),
        RulesAtStop::Removed => tracing::info!("firewall rules and policy routes removed"),
        RulesAtStop::None => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// What the administrator must know about what is (not) captured: one
/// line each, at start.
fn log_capture_caveats(plan: &Plan, listen: std::net::SocketAddr) {
    // No transparent listener: nothing is captured, nothing to say.
    if !plan.captures() {
        return;
    }
    let target = firewall::nft::tproxy_target(plan.serves, plan.listen_port);
    if plan.backend == Backend::None {
        if plan.mode == Mode::Tproxy {
            tracing::info!(
                "firewall none: your TPROXY rules must point at this listener (nft: `{target}`)"
            );
        }
        return;
    }
    if let Some(family) = plan.serves.missing_family() {
        tracing::warn!(
            "listen {listen} serves one family only: {family} flows are not captured and go out directly; listen on [::]:{} to capture IPv4 and IPv6",
            plan.listen_port
        );
    }
    if plan.mode == Mode::Tproxy && !plan.fail_closed {
        match plan.backend {
            Backend::Nftables => tracing::info!(
                "fail open: should tproxyd die without removing its rules (kill -9, a crash), captured traffic goes out directly until they are removed; set firewall.fail_closed = true to drop it instead"
            ),
            _ => tracing::info!(
                "fail closed by nature: with the iptables backend, captured traffic is dropped whenever tproxyd is not running and its rules remain (`tproxyd rules remove` lifts them)"
            ),
        }
    }
}

fn rules(action: RulesAction, args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = match load_or_report(&args) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let plan = Plan::from_config(&cfg);
    // Removing needs no rule-set file: a missing one must not keep the
    // rules in place.
    let plan = match action {
        RulesAction::Remove => plan,
        _ => plan.load_bypass_sets(&cfg)?,
    };
    match action {
        RulesAction::Print => print!("{}", plan.describe()),
        RulesAction::Apply => {
            runtime(1)?.block_on(firewall::apply(&plan))?;
            println!("tproxyd rules installed ({})", plan.backend);
        }
        RulesAction::Remove => {
            runtime(1)?.block_on(firewall::remove(&plan))?;
            println!("tproxyd rules removed ({})", plan.backend);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = match load_or_report(&args) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let findings = runtime(1)?.block_on(firewall::doctor::diagnose(&cfg));
    for f in &findings {
        println!("{f}");
    }
    let failed = findings
        .iter()
        .filter(|f| f.status == firewall::doctor::Status::Fail)
        .count();
    if failed > 0 {
        println!("{failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `tproxyd --version`: the version and the optional features this build
/// has, since a router build may leave some out
/// (docs/configuration.md#build-features).
fn version_line() -> String {
    let features: Vec<&str> = [
        ("api", cfg!(feature = "api")),
        ("metrics", cfg!(feature = "metrics")),
        ("quic", cfg!(feature = "quic")),
        ("dns-tls", cfg!(feature = "dns-tls")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(" ")
    };
    format!("{} (features: {features})", env!("CARGO_PKG_VERSION"))
}

fn main() -> ExitCode {
    // Leaked once: clap keeps a 'static version string.
    let version: &'static str = Box::leak(version_line().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Run { args, user } => run(args, user),
        Command::Rules { action, args } => rules(action, args),
        Command::Doctor { args } => doctor(args),
        Command::Demo { hold } => demo::run(hold).map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "testbed")]
        Command::Testbed { action } => testbed(action),
        Command::Check { config } => {
            let loaded = RawConfig::load(&config)
                .and_then(|raw| raw.validate(&env_var))
                .and_then(|cfg| tproxyd::dns::check_system_servers(&cfg).map(|()| cfg));
            match loaded {
                // Rule-set files and regexes are only read by building the
                // rules: a bad one must show here, not first at start.
                Ok(cfg) => match Policy::check(&cfg) {
                    Ok(()) => {
                        println!("{}: ok", config.display());
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        Ok(ExitCode::from(2))
                    }
                },
                Err(e) => {
                    print_config_error(&e);
                    Ok(ExitCode::from(2))
                }
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
