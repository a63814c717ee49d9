//! The termination signals' mask around start-up: blocked while tproxyd
//! installs its rules and switches user, so that a stop signal waits
//! instead of killing it with its rules in place; unblocked once the
//! runtime's handlers are there.

use std::io;

fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP for this thread and the threads it
/// starts: they stay pending until [`unblock_termination_signals`].
/// Programs it runs start with an empty mask (`std::process::Command`
/// clears it).
pub fn block_termination_signals() -> io::Result<()> {
    termination_signals()
        .thread_block()
        .map_err(io::Error::from)
}

/// Unblocks SIGINT, SIGTERM and SIGHUP for this thread and the threads it
/// starts.
///
/// A blocked signal mask is inherited across exec: a parent that blocks
/// them (a supervisor, or `tproxyd demo` catching Ctrl-C) would otherwise
/// leave tproxyd deaf to SIGTERM, and its rules would never be removed.
///
/// SIGHUP is caught and logged (reload is not supported yet); blocked, it
/// would never reach the handler that says so.
pub fn unblock_termination_signals() -> io::Result<()> {
    termination_signals()
        .thread_unblock()
        .map_err(io::Error::from)
}
