//! The binary's edge: `check` exit codes and messages, and start-up
//! errors that must be one clear line naming the problem and the fix.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tproxyd");

/// Runs tproxyd with a time limit, so a start that wrongly succeeds
/// cannot hang the suite.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("TPROXYD_PASSWORD")
        .env_remove("TPROXYD_USERNAME")
        .env_remove("TPROXYD_UPSTREAM");
    run_cmd(cmd.args(args).envs(env.iter().copied()))
}

fn run_cmd(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tproxyd {cmd:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn check_accepts_the_example_config() {
    let o = run(
        &[
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tproxyd.toml"),
        ],
        &[("TPROXYD_PASSWORD", "x")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(": ok"));
}

#[test]
fn check_lists_every_problem_with_its_key_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("tproxyd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    // A value of the wrong shape is a parse error naming key and line.
    std::fs::write(&file, "listen = \"1090\"\n[outbound]\ntype = \"direct\"\n").unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 1") && err.contains("is not IP:PORT"),
        "{err}"
    );

    // Keys that disagree with each other are all listed in one pass.
    std::fs::write(
        &file,
        "mode = \"redirect\"\nudp = true\nmark = 0\n[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\nusername = \"u\"\n",
    )
    .unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error: udp: ") && l.contains("TCP only")),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("error: mark: ")),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error: outbound.password: username is set but no password")),
        "{err}"
    );

    std::fs::write(&file, "[outbound]\ntype = \"direct\"\nbogus = 1\n").unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bogus"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);

    let o = run(&["check", "-c", "/nonexistent/tproxyd.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read /nonexistent/tproxyd.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn redirect_mode_refuses_udp_with_a_reason() {
    let o = run(
        &["run", "--mode", "redirect", "--udp-only", "--direct"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("serves TCP only"), "{}", stderr(&o));
}

#[test]
fn run_without_an_outbound_says_what_to_add() {
    let o = run(&["run"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--upstream URL, --socks5 IP:PORT or --direct"),
        "{}",
        stderr(&o)
    );
}

/// `--upstream URL` (or the URL in TPROXYD_UPSTREAM) gives the outbound:
/// its server is never captured, as with `--socks5`. A login on the
/// command line is warned about (`ps` shows it), never printed.
#[test]
fn an_upstream_url_gives_the_outbound() {
    for (url, via_env) in [
        ("socks5://alice:s3cret@203.0.113.2:1080", false),
        ("socks5://alice:s3cret@203.0.113.2:1080", true),
        ("http://203.0.113.2:3128", false),
        ("socks5h://[2001:db8::2]:1080", false),
    ] {
        let mut args = vec!["rules", "print", "--lan-interface", "eth1"];
        let mut env = Vec::new();
        if via_env {
            env.push(("TPROXYD_UPSTREAM", url));
        } else {
            args.extend(["--upstream", url]);
        }
        let o = run(&args, &env);
        assert_eq!(o.status.code(), Some(0), "{url}: {}", stderr(&o));
        let rules = String::from_utf8_lossy(&o.stdout);
        let server = if url.contains("2001:db8") {
            "2001:db8::2/128"
        } else {
            "203.0.113.2/32"
        };
        assert!(
            rules.contains(server),
            "{url}: the server is bypassed\n{rules}"
        );
        let err = stderr(&o);
        assert!(
            !err.contains("s3cret") && !rules.contains("s3cret"),
            "{err}"
        );
        let warned = err.contains("`ps` shows to every user");
        assert_eq!(warned, url.contains('@') && !via_env, "{url}: {err}");
    }
}

#[test]
fn a_bad_upstream_url_is_named_without_its_secret() {
    for (url, says) in [
        (
            "ftp://203.0.113.2:21",
            "--upstream: unknown URL scheme \"ftp\": the schemes tproxyd reads are socks5://",
        ),
        (
            "socks5://alice:hunter2@203.0.113.2",
            "--upstream: socks5:// URL: the server after // is not IP:PORT",
        ),
        ("socks5://alice:hunter2", "is not IP:PORT"),
        (
            "http://alice:hun%zzter2@203.0.113.2:1",
            "the password has a % not followed by two hex digits",
        ),
        (
            "socks5://alice@203.0.113.2:1080",
            "outbound.password: username is set but no password",
        ),
    ] {
        let o = run(&["rules", "print", "--upstream", url], &[]);
        assert_eq!(o.status.code(), Some(2), "{url}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(says), "{url}: {err}");
        assert!(!err.contains("hunter2") && !err.contains("hun%zz"), "{err}");
    }
    // From the environment with a config file: named, both ways in.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tproxyd.toml");
    let o = run(
        &["rules", "print", "-c", example],
        &[("TPROXYD_UPSTREAM", "socks5://203.0.113.2:1080")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--upstream: cannot be used with -c FILE (it comes from --upstream or TPROXYD_UPSTREAM)"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &[
            "rules",
            "print",
            "--upstream",
            "http://203.0.113.2:1",
            "--socks5",
            "203.0.113.2:1080",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}

#[test]
fn missing_cap_net_admin_is_named() {
    // As root, drop to an unprivileged user; otherwise we already are one.
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:1",
        "--direct",
        "--firewall",
        "none",
    ]);
    let o = run_cmd(&mut cmd);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("needs CAP_NET_ADMIN"), "{err}");
    // With UDP on (the default), the hint names both capabilities.
    assert!(
        err.contains("setcap cap_net_admin,cap_net_bind_service+ep"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

#[test]
fn port_in_use_is_one_clear_line() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root under CI"
        );
        eprintln!("skipping: needs root (CAP_NET_ADMIN) to get past the capability check");
        return;
    }
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let o = run(
        &[
            "run",
            "--listen",
            &addr.to_string(),
            "--direct",
            "--tcp-only",
            "--firewall",
            "none",
        ],
        &[],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("port {} is already in use", addr.port())),
        "{err}"
    );
}

/// Marks are written in hex in docs/configuration.md and by iptables: the flag takes
/// both forms (it refused `0xff` before).
#[test]
fn marks_on_the_command_line_may_be_hex() {
    for mark in ["0xff", "255"] {
        let o = run(
            &[
                "rules",
                "print",
                "--direct",
                "--lan-interface",
                "eth1",
                "--mark",
                mark,
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{mark}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("meta mark 0xff return"), "{mark}: {text}");
    }
    let o = run(&["rules", "print", "--direct", "--mark", "0xfg"], &[]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("not a 32-bit mark"), "{}", stderr(&o));
}

/// The router example in the README is a working config: `check` accepts
/// it once its two list files exist (paths moved to a temp dir).
#[test]
fn the_readme_router_example_passes_check() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("### A router example")
        .expect("README has a router example");
    let block = &readme[start..];
    let toml_start = block.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let toml_end = toml_start + block[toml_start..].find("```").expect("block end");
    let dir = std::env::temp_dir().join(format!("tproxyd-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chnroute = dir.join("chnroute.txt");
    let chnlist = dir.join("chnlist.conf");
    std::fs::write(&chnroute, "1.0.1.0/24\n1.0.2.0/23\n").unwrap();
    std::fs::write(&chnlist, "server=/baidu.com/114.114.114.114\n").unwrap();
    let text = block[toml_start..toml_end]
        .replace("/etc/tproxyd/chnroute.txt", &chnroute.display().to_string())
        .replace(
            "/etc/tproxyd/accelerated-domains.china.conf",
            &chnlist.display().to_string(),
        );
    let file = dir.join("router.toml");
    std::fs::write(&file, text).unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One value where a list is expected is a list of one, for every list
/// key (`protocol = "quic"`, `dst_port = "53"`, ...); a wrong one is
/// still a parse error naming its key and line.
#[test]
fn check_accepts_one_value_for_a_list() {
    let dir = std::env::temp_dir().join(format!("tproxyd-cli-one-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cn = dir.join("cn.txt");
    std::fs::write(&cn, "1.0.1.0/24\n").unwrap();
    let file = dir.join("one.toml");
    let text = format!(
        "[[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"proxy\"\n\
         [[route.rule_sets]]\nname = \"cn\"\nformat = \"cidr\"\npath = \"{}\"\n\
         [[route.rules]]\nrule_set = \"cn\"\noutbound = \"direct\"\n\
         [[route.rules]]\nprotocol = \"quic\"\ndst_port = \"443\"\noutbound = \"proxy\"\n\
         [[route.rules]]\ndomain_suffix = \"a.com\"\ndomain = \"b.com\"\ndomain_keyword = \"shop\"\n\
         domain_regex = \"^c\"\ndst = \"192.0.2.0/24\"\nsrc = \"198.51.100.0/24\"\n\
         dst_port = \"1000-2000\"\noutbound = \"direct\"\n\
         [firewall]\nlan_interfaces = \"br-lan\"\nsource_cidrs = \"192.168.1.0/24\"\n\
         tcp_ports = \"80\"\nudp_ports = \"53\"\nbypass = \"192.0.2.0/24\"\nbypass_rule_sets = \"cn\"\n",
        cn.display()
    );
    std::fs::write(&file, &text).unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    std::fs::write(&file, text.replace("\"quic\"", "\"quik\"")).unwrap();
    let o = run(&["check", "-c", file.to_str().unwrap()], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line = 1 + text[..text.find("protocol").unwrap()].matches('\n').count();
    assert!(
        err.contains(&format!("line {line},")) && err.contains("protocol = \"quik\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
