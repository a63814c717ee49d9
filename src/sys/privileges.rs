//! Privileges: which capabilities this process holds (and the ambient and
//! bounding sets its children inherit), the service user from
//! /etc/passwd, and `switch_user`, which drops from root to that user
//! keeping only CAP_NET_ADMIN (and CAP_NET_BIND_SERVICE when asked).

use std::io;

/// Bits of the capabilities tproxyd needs, in the masks of
/// `/proc/self/status` (linux/capability.h).
const CAP_NET_BIND_SERVICE_BIT: u32 = 10;
const CAP_NET_ADMIN_BIT: u32 = 12;

/// Whether this process holds CAP_NET_ADMIN in its effective set.
///
/// Read from `/proc/self/status` rather than probed with a setsockopt, so
/// the answer can name the missing capability before anything is bound.
pub fn has_cap_net_admin() -> io::Result<bool> {
    has_capability(CAP_NET_ADMIN_BIT)
}

/// Whether this process may bind ports below
/// `net.ipv4.ip_unprivileged_port_start`: UDP replies leave from the port
/// the client wrote to (53 for DNS), so a transparent reply socket must
/// bind it.
pub fn has_cap_net_bind_service() -> io::Result<bool> {
    has_capability(CAP_NET_BIND_SERVICE_BIT)
}

fn has_capability(bit: u32) -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(parse_cap_eff(&status).is_some_and(|caps| caps & (1 << bit) != 0))
}

/// The lowest port anyone may bind without CAP_NET_BIND_SERVICE in this
/// network namespace (IPv4 and IPv6 alike); 1024 unless changed.
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// A set of capabilities as the kernel's 64-bit masks hold them: bit N is
/// capability N of linux/capability.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

const CAP_SETPCAP_BIT: u32 = 8;

impl CapSet {
    pub const EMPTY: CapSet = CapSet(0);
    pub const NET_BIND_SERVICE: CapSet = CapSet(1 << CAP_NET_BIND_SERVICE_BIT);
    pub const NET_ADMIN: CapSet = CapSet(1 << CAP_NET_ADMIN_BIT);
    const SETPCAP: CapSet = CapSet(1 << CAP_SETPCAP_BIT);

    pub fn union(self, other: CapSet) -> CapSet {
        CapSet(self.0 | other.0)
    }

    pub fn contains(self, other: CapSet) -> bool {
        self.0 & other.0 == other.0
    }

    fn has_bit(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// The capability numbers in the set, lowest first.
    pub fn bits(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |&b| self.has_bit(b))
    }
}

impl std::fmt::Display for CapSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("no capabilities");
        }
        let names: Vec<String> = self
            .bits()
            .map(|b| match b {
                CAP_SETPCAP_BIT => "CAP_SETPCAP".to_string(),
                CAP_NET_BIND_SERVICE_BIT => "CAP_NET_BIND_SERVICE".to_string(),
                CAP_NET_ADMIN_BIT => "CAP_NET_ADMIN".to_string(),
                other => format!("capability {other}"),
            })
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// The calling thread's effective, permitted and inheritable sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable: CapSet,
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: version 3 passes two of them, the low
/// and the high 32 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// capget(2) for the calling thread.
pub fn get_caps() -> io::Result<Caps> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapUserData::default(); 2];
    // SAFETY: version 3 reads one header and writes two data structs,
    // both of the layout the kernel defines and both valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapUserHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | (u64::from(hi) << 32));
    Ok(Caps {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// capset(2) for the calling thread only: capabilities are per thread.
pub fn set_caps(caps: Caps) -> io::Result<()> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |s: CapSet, high: bool| if high { (s.0 >> 32) as u32 } else { s.0 as u32 };
    let data: [CapUserData; 2] = [false, true].map(|high| CapUserData {
        effective: half(caps.effective, high),
        permitted: half(caps.permitted, high),
        inheritable: half(caps.inheritable, high),
    });
    // SAFETY: as in get_caps; the kernel only reads the data here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapUserHeader,
            data.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// prctl(2) with integer arguments only.
fn prctl(option: libc::c_int, arg2: u64, arg3: u64) -> io::Result<libc::c_int> {
    // SAFETY: every option used in this file takes plain integers, no
    // pointers; the unused arguments must be zero.
    let r = unsafe {
        libc::prctl(
            option,
            arg2 as libc::c_ulong,
            arg3 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The ambient set: capabilities a program keeps across exec (Linux 4.3).
/// This is how the firewall tools tproxyd runs (nft, iptables-restore)
/// get CAP_NET_ADMIN when tproxyd itself is not root.
pub fn ambient_caps() -> io::Result<CapSet> {
    let mut set = CapSet::EMPTY;
    for bit in 0..64u32 {
        match prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as u64,
            bit.into(),
        ) {
            Ok(1) => set.0 |= 1 << bit,
            Ok(_) => {}
            // Past the last capability this kernel knows.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// Replaces the ambient set with `set`, which must be in both the permitted
/// and the inheritable set.
pub fn set_ambient_caps(set: CapSet) -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
        0,
    )?;
    for bit in set.bits() {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as u64,
            bit.into(),
        )?;
    }
    Ok(())
}

/// The bounding set: the most any program this process runs can gain.
pub fn bounding_caps() -> io::Result<CapSet> {
    let mut set = CapSet::EMPTY;
    for bit in 0..64u32 {
        match prctl(libc::PR_CAPBSET_READ, bit.into(), 0) {
            Ok(1) => set.0 |= 1 << bit,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// Drops everything but `keep` from the bounding set (needs CAP_SETPCAP
/// in the effective set).
fn limit_bounding_caps(keep: CapSet) -> io::Result<()> {
    for bit in bounding_caps()?.bits().filter(|&b| !keep.has_bit(b)) {
        prctl(libc::PR_CAPBSET_DROP, bit.into(), 0)?;
    }
    Ok(())
}

/// The user tproxyd runs as after start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// As given (a name, or the numbers).
    pub name: String,
    pub uid: u32,
    /// The primary group; supplementary groups are dropped.
    pub gid: u32,
}

/// How `user` may be written: a name, a UID (both looked up in
/// /etc/passwd), or UID:GID (taken as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Name(String),
    Uid(u32),
    UidGid(u32, u32),
}

impl UserSpec {
    pub fn parse(text: &str) -> Result<UserSpec, String> {
        let numbers = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((u, g)) = text.split_once(':') {
            return match (numbers(u), numbers(g), u.parse(), g.parse()) {
                (true, true, Ok(u), Ok(g)) => Ok(UserSpec::UidGid(u, g)),
                _ => Err(format!("{text:?} is neither a user name nor UID:GID")),
            };
        }
        if numbers(text) {
            return text
                .parse()
                .map(UserSpec::Uid)
                .map_err(|_| format!("{text:?} is not a 32-bit UID"));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || "._-$".contains(c);
        if text.is_empty() || !text.chars().all(name_char) || text.starts_with('-') {
            return Err(format!("{text:?} is not a user name"));
        }
        Ok(UserSpec::Name(text.to_string()))
    }
}

/// Finds `spec` in the text of an /etc/passwd file.
pub fn find_account(passwd: &str, spec: &UserSpec) -> Option<Account> {
    if let UserSpec::UidGid(uid, gid) = *spec {
        return Some(Account {
            name: format!("{uid}:{gid}"),
            uid,
            gid,
        });
    }
    passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (name, uid, gid) = (f.first()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            Some(Account {
                name: name.to_string(),
                uid,
                gid,
            })
        })
        .find(|a| match spec {
            UserSpec::Name(n) => a.name == *n,
            UserSpec::Uid(u) => a.uid == *u,
            UserSpec::UidGid(..) => false,
        })
}

pub const PASSWD: &str = "/etc/passwd";

/// Why tproxyd could not become its service user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user: {0}")]
    BadSpec(String),
    #[error(
        "user {user:?} is not in {PASSWD}: create it (useradd --system --no-create-home \
         --shell /usr/sbin/nologin {user}) or give the numbers as UID:GID. tproxyd reads \
         {PASSWD} itself (no NSS, so the static build behaves the same)"
    )]
    UnknownUser { user: String },
    #[error("cannot read {PASSWD} to find user {user:?}: {source}")]
    Passwd { user: String, source: io::Error },
    #[error(
        "cannot switch to user {user}: the process has {threads} threads, and capabilities \
         are per thread (a bug in tproxyd: the switch must come before any thread starts)"
    )]
    Threads { user: String, threads: usize },
    #[error("cannot switch to user {user}: tproxyd does not hold {missing} itself")]
    Missing { user: String, missing: CapSet },
    #[error("cannot switch to user {user}: {step}: {source}{hint}")]
    Step {
        user: String,
        step: &'static str,
        source: io::Error,
        hint: &'static str,
    },
}

/// Looks `spec` up in /etc/passwd (read directly, see [`PrivilegeError::UnknownUser`]).
pub fn lookup_account(spec: &str) -> Result<Account, PrivilegeError> {
    let parsed = UserSpec::parse(spec).map_err(PrivilegeError::BadSpec)?;
    if let UserSpec::UidGid(..) = parsed {
        return Ok(find_account("", &parsed).expect("UID:GID needs no lookup"));
    }
    let text = std::fs::read_to_string(PASSWD).map_err(|source| PrivilegeError::Passwd {
        user: spec.to_string(),
        source,
    })?;
    find_account(&text, &parsed).ok_or_else(|| PrivilegeError::UnknownUser {
        user: spec.to_string(),
    })
}

/// Threads of this process, from /proc.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Becomes `account` (its UID, its primary group, no supplementary groups)
/// and keeps only `keep`: in the effective, permitted and inheritable
/// sets, in the ambient set so that the firewall tools tproxyd runs get
/// them too, and (when tproxyd may change it) in the bounding set. Sets
/// no_new_privs last: nothing tproxyd runs can gain privileges again.
///
/// Capabilities and the keep-capabilities flag belong to each thread,
/// while glibc's setresuid changes every thread's UID: another thread
/// would lose all capabilities, so this refuses to run unless the process
/// has exactly one thread.
///
/// Already running as `account` (a service manager started tproxyd as
/// that user), it only trims the capabilities.
pub fn switch_user(account: &Account, keep: CapSet) -> Result<(), PrivilegeError> {
    use nix::unistd::{getgroups, getresgid, getresuid, setgroups, setresgid, setresuid};
    use nix::unistd::{Gid, Uid};
    let user = format!(
        "{} (uid {}, gid {})",
        account.name, account.uid, account.gid
    );
    let step = |step: &'static str, hint: &'static str| {
        let user = user.clone();
        move |source: io::Error| PrivilegeError::Step {
            user,
            step,
            source,
            hint,
        }
    };
    let threads = thread_count().map_err(step("counting threads in /proc/self/task", ""))?;
    if threads != 1 {
        return Err(PrivilegeError::Threads { user, threads });
    }
    let before = get_caps().map_err(step("capget", ""))?;
    if !before.permitted.contains(keep) {
        return Err(PrivilegeError::Missing {
            user,
            missing: CapSet(keep.0 & !before.permitted.0),
        });
    }
    let uids = getresuid()
        .map_err(io::Error::from)
        .map_err(step("getresuid", ""))?;
    let gids = getresgid()
        .map_err(io::Error::from)
        .map_err(step("getresgid", ""))?;
    let groups = getgroups()
        .map_err(io::Error::from)
        .map_err(step("getgroups", ""))?;
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    let already = [uids.real, uids.effective, uids.saved] == [uid; 3]
        && [gids.real, gids.effective, gids.saved] == [gid; 3]
        && groups.iter().all(|g| *g == gid);
    const NEEDS_ROOT: &str = " (switching users needs root, or CAP_SETUID and CAP_SETGID)";
    if !already {
        // Without it, leaving UID 0 empties the permitted set.
        prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(step("prctl(PR_SET_KEEPCAPS)", ""))?;
        setgroups(&[])
            .map_err(io::Error::from)
            .map_err(step("setgroups", NEEDS_ROOT))?;
        setresgid(gid, gid, gid)
            .map_err(io::Error::from)
            .map_err(step("setresgid", NEEDS_ROOT))?;
        setresuid(uid, uid, uid)
            .map_err(io::Error::from)
            .map_err(step("setresuid", NEEDS_ROOT))?;
        prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(step("prctl(PR_SET_KEEPCAPS)", ""))?;
    }
    // The UID change emptied the effective set; the permitted set is intact.
    let now = get_caps().map_err(step("capget", ""))?;
    let wanted = Caps {
        effective: keep,
        permitted: keep,
        inheritable: keep,
    };
    let ambient = ambient_caps().map_err(step("prctl(PR_CAP_AMBIENT_IS_SET)", ""))?;
    if already && now == wanted && ambient == keep {
        // Started as the user with exactly these (systemd's User= and
        // AmbientCapabilities=, whose syscall filter may refuse capset).
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(step("prctl(PR_SET_NO_NEW_PRIVS)", ""))?;
        return Ok(());
    }
    if now.permitted.contains(CapSet::SETPCAP) {
        set_caps(Caps {
            effective: keep.union(CapSet::SETPCAP),
            permitted: now.permitted,
            inheritable: CapSet::EMPTY,
        })
        .map_err(step("capset", ""))?;
        limit_bounding_caps(keep).map_err(step("prctl(PR_CAPBSET_DROP)", ""))?;
    }
    set_caps(wanted).map_err(step("capset", ""))?;
    set_ambient_caps(keep).map_err(step("prctl(PR_CAP_AMBIENT)", ""))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(step("prctl(PR_SET_NO_NEW_PRIVS)", ""))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::set_mark;

    #[test]
    fn cap_eff_is_parsed_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n";
        assert_eq!(parse_cap_eff(status), Some(0x1000));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn user_specs_parse_names_uids_and_pairs() {
        assert_eq!(
            UserSpec::parse("tproxyd"),
            Ok(UserSpec::Name("tproxyd".into()))
        );
        assert_eq!(UserSpec::parse("999"), Ok(UserSpec::Uid(999)));
        assert_eq!(UserSpec::parse("999:995"), Ok(UserSpec::UidGid(999, 995)));
        for bad in ["", "a b", "-x", "999:", ":1", "x:1", "99999999999", "a/b"] {
            assert!(UserSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accounts_are_found_in_passwd_text() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\nbroken line\n\
                      tproxyd:x:999:995::/nonexistent:/usr/sbin/nologin\n";
        let want = Account {
            name: "tproxyd".into(),
            uid: 999,
            gid: 995,
        };
        let find = |s: &str| find_account(passwd, &UserSpec::parse(s).unwrap());
        assert_eq!(find("tproxyd"), Some(want.clone()));
        assert_eq!(find("999"), Some(want));
        assert_eq!(find("nobody"), None);
        assert_eq!(find("1000"), None);
        // Numbers need no entry.
        assert_eq!(
            find("1000:1000").map(|a| (a.uid, a.gid)),
            Some((1000, 1000))
        );
        assert!(matches!(
            lookup_account("no-such-user-tpd"),
            Err(PrivilegeError::UnknownUser { .. })
        ));
        assert_eq!(lookup_account("root").unwrap().uid, 0);
    }

    #[test]
    fn capget_agrees_with_proc_and_capset_round_trips() {
        let caps = get_caps().unwrap();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert_eq!(Some(caps.effective.0), parse_cap_eff(&status));
        set_caps(caps).unwrap();
        assert_eq!(get_caps().unwrap(), caps);
        // Every thread has a bounding set; root's holds CAP_NET_ADMIN.
        let bounding = bounding_caps().unwrap();
        assert!(bounding.contains(caps.permitted), "{bounding:?} {caps:?}");
        assert!(ambient_caps().unwrap().0 & !caps.permitted.0 == 0);
        assert_eq!(
            CapSet::NET_ADMIN
                .union(CapSet::NET_BIND_SERVICE)
                .to_string(),
            "CAP_NET_BIND_SERVICE, CAP_NET_ADMIN"
        );
    }

    #[test]
    fn switching_users_is_refused_while_other_threads_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let before = (nix::unistd::getresuid().unwrap(), get_caps().unwrap());
        let nobody = Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let err = switch_user(&nobody, CapSet::NET_ADMIN).unwrap_err();
        assert!(matches!(err, PrivilegeError::Threads { .. }), "{err}");
        assert_eq!(
            (nix::unistd::getresuid().unwrap(), get_caps().unwrap()),
            before,
            "nothing may change"
        );
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
    }

    /// Runs the ignored test `name` alone in a new process of this test
    /// binary (on its main thread, so single-threaded, as tproxyd is when
    /// it switches) and fails if it fails. Needs root.
    fn in_own_process(name: &str) {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{name} needs root (CI=true: failing, not skipping)"
            );
            eprintln!("skipping {name}: needs root");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                name,
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the test did not run:\n{text}");
    }

    /// What a program this process starts would hold: the capability
    /// lines of its /proc/self/status.
    fn child_caps() -> (u64, u64) {
        let out = std::process::Command::new("/bin/cat")
            .arg("/proc/self/status")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
                .unwrap()
        };
        (field("CapEff:"), field("CapAmb:"))
    }

    /// Runs `f` in a forked child, single-threaded as tproxyd is when it
    /// switches (libtest runs each test on a thread of its own), and fails
    /// if `f` fails.
    fn in_forked_child(f: impl FnOnce()) {
        // SAFETY: this process runs this one test; its only other thread
        // is libtest's main thread, waiting for the test and holding no
        // lock the child could need.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            // SAFETY: ends the child without running the parent's exit code.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` is valid.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed (status {status:#x})"
        );
    }

    fn switch_to_nobody_keeping(keep: CapSet) {
        assert_eq!(thread_count().unwrap(), 1, "must run single-threaded");
        let nobody = Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        switch_user(&nobody, keep).unwrap();
        let ids = nix::unistd::getresuid().unwrap();
        assert_eq!(
            [ids.real, ids.effective, ids.saved].map(|u| u.as_raw()),
            [65534; 3]
        );
        let gids = nix::unistd::getresgid().unwrap();
        assert_eq!(
            [gids.real, gids.effective, gids.saved].map(|g| g.as_raw()),
            [65534; 3]
        );
        assert!(nix::unistd::getgroups().unwrap().is_empty());
        let caps = get_caps().unwrap();
        assert_eq!(
            (caps.effective, caps.permitted, caps.inheritable),
            (keep, keep, keep)
        );
        assert_eq!(ambient_caps().unwrap(), keep);
        assert_eq!(bounding_caps().unwrap(), keep);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        // The capabilities survive exec, as nft and iptables-restore need.
        assert_eq!(child_caps(), (keep.0, keep.0));
        // And they work: SO_MARK needs CAP_NET_ADMIN.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_mark(&socket, 7).unwrap();
        let low = std::net::UdpSocket::bind("127.0.0.1:1");
        if keep.contains(CapSet::NET_BIND_SERVICE) {
            low.unwrap();
        } else if unprivileged_port_start() > 1 {
            assert_eq!(low.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        }
        // Already that user with those capabilities (a service manager
        // started it so): nothing to change, and no setuid/capset needed.
        switch_user(&nobody, keep).unwrap();
        assert_eq!(get_caps().unwrap(), caps);
        // Asking for more than it holds names what is missing.
        let err = switch_user(&nobody, CapSet(keep.0 | 1)).unwrap_err();
        assert!(matches!(err, PrivilegeError::Missing { .. }), "{err}");
    }

    #[test]
    #[ignore = "run in a process of its own by switch_user_keeps_only_net_admin"]
    fn own_process_switch_keeping_net_admin() {
        in_forked_child(|| switch_to_nobody_keeping(CapSet::NET_ADMIN));
    }

    #[test]
    #[ignore = "run in a process of its own by switch_user_keeps_both_capabilities"]
    fn own_process_switch_keeping_both() {
        let both = CapSet::NET_ADMIN.union(CapSet::NET_BIND_SERVICE);
        in_forked_child(|| switch_to_nobody_keeping(both));
    }

    #[test]
    fn switch_user_keeps_only_net_admin() {
        in_own_process("sys::privileges::tests::own_process_switch_keeping_net_admin");
    }

    #[test]
    fn switch_user_keeps_both_capabilities() {
        in_own_process("sys::privileges::tests::own_process_switch_keeping_both");
    }

    #[test]
    fn capabilities_match_what_root_holds() {
        let root = nix::unistd::Uid::effective().is_root();
        // Root (as the tests run in CI) holds both; anyone else neither,
        // unless granted, in which case there is nothing to compare.
        if root {
            assert!(has_cap_net_admin().unwrap());
            assert!(has_cap_net_bind_service().unwrap());
        }
        let start = unprivileged_port_start();
        assert!(start <= 1024, "ip_unprivileged_port_start = {start}");
    }
}
