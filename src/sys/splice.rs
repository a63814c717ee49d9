//! splice(2) pipes: the TCP relay's zero-copy path.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::unistd::pipe2;

/// A kernel pipe that moves a relay's bytes from one socket to another
/// with splice(2), so they are never copied into user space.
///
/// Both ends are non-blocking: a full pipe or an empty socket answers
/// `WouldBlock` instead of parking a runtime thread.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        Ok(Pipe { read, write })
    }

    /// Moves up to `max` bytes from the socket `src` into the pipe.
    /// `Ok(0)` means the peer closed its write side (EOF).
    pub fn fill_from<S: AsFd>(&self, src: &S, max: usize) -> io::Result<usize> {
        splice(
            src,
            None,
            &self.write,
            None,
            max,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }

    /// Moves up to `max` bytes from the pipe into the socket `dst`.
    pub fn drain_to<S: AsFd>(&self, dst: &S, max: usize) -> io::Result<usize> {
        splice(
            &self.read,
            None,
            dst,
            None,
            max,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shutdown_write;
    use std::time::Duration;

    #[test]
    fn pipe_moves_bytes_between_sockets_and_reports_eof() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (src, _) = listener.accept().unwrap();
        let listener2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut receiver = std::net::TcpStream::connect(listener2.local_addr().unwrap()).unwrap();
        let (dst, _) = listener2.accept().unwrap();
        src.set_nonblocking(true).unwrap();

        let pipe = Pipe::new().unwrap();
        // Nothing sent yet: the non-blocking splice must not block.
        let err = pipe.fill_from(&src, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        std::io::Write::write_all(&mut sender, b"spliced bytes").unwrap();
        let mut moved = 0;
        while moved < 13 {
            match pipe.fill_from(&src, 4096) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.drain_to(&dst, 4096).unwrap(), 13);
        let mut got = [0u8; 13];
        std::io::Read::read_exact(&mut receiver, &mut got).unwrap();
        assert_eq!(&got, b"spliced bytes");

        sender.shutdown(std::net::Shutdown::Write).unwrap();
        let eof = loop {
            match pipe.fill_from(&src, 4096) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(eof, 0, "EOF reads as zero bytes");
        shutdown_write(&dst).unwrap();
        assert_eq!(std::io::Read::read(&mut receiver, &mut got).unwrap(), 0);
    }
}
