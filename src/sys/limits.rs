//! Descriptor limits: RLIMIT_NOFILE, raised at start, and how many
//! descriptors this process holds.

use std::io;

/// Raises the soft open-file limit to the hard limit and returns it.
///
/// Each TCP flow costs two descriptors and each UDP session one or two; the
/// common soft limit of 1024 is reached by a few hundred flows.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// The soft open-files limit (RLIMIT_NOFILE) in force now: the most
/// descriptors this process may hold at once. `usize::MAX` when the
/// kernel reports no limit.
pub fn nofile_limit() -> io::Result<usize> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(usize::try_from(soft).unwrap_or(usize::MAX))
}

/// How many descriptors this process holds now, counted in
/// `/proc/self/fd`. A directory walk: for start-up and rare checks, not
/// for every flow.
pub fn open_descriptors() -> io::Result<usize> {
    // The walk itself holds one descriptor for the directory; leave it out.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Pipe;

    /// The soft limit, checked against what the kernel shows in
    /// /proc/self/limits ("Max open files  SOFT  HARD  files").
    #[test]
    fn nofile_limit_is_the_soft_limit_in_force() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        let got = nofile_limit().unwrap();
        if soft == "unlimited" {
            assert_eq!(got, usize::MAX);
        } else {
            assert_eq!(got, soft.parse::<usize>().unwrap());
        }
    }

    #[test]
    fn open_descriptors_counts_this_process() {
        let n = open_descriptors().unwrap();
        // stdin, stdout and stderr at least, and never past the limit.
        assert!(n >= 3, "{n}");
        assert!(n <= nofile_limit().unwrap(), "{n}");
        // Other tests open and close descriptors in parallel, so compare
        // loosely: holding 200 more must show.
        let pipes: Vec<Pipe> = (0..100).map(|_| Pipe::new().unwrap()).collect();
        assert!(open_descriptors().unwrap() >= 200, "pipes not counted");
        drop(pipes);
    }
}
