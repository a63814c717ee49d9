//! Opens and holds idle TCP flows, for the memory figures measured inside
//! the qemu guests (scripts/rss-router, bench/ROUTERS.md): std only, so it
//! builds for any router target with `rustc` alone.
//!
//! ```text
//! idle_flows serve ADDR            accept, answer one byte, hold
//! idle_flows connect ADDR N SECS   open N connections to ADDR one after
//!                                  the other, each with a byte there and
//!                                  back, print "connected N", hold them
//!                                  SECS seconds
//! ```
//!
//! The byte there and back makes each flow whole end to end (tproxyd's
//! upstream connection made) before the next starts, so the count held is
//! the count measured, and the client never has more than one connect
//! waiting on tproxyd's upstream (its per-client limit resets the rest).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let mut held = Vec::new();
    loop {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut byte = [0u8; 1];
        // A client that sends nothing is held all the same.
        if stream.read_exact(&mut byte).is_ok() {
            let _ = stream.write_all(&byte);
        }
        held.push(stream);
    }
}

fn connect(addr: SocketAddr, n: usize, secs: u64) -> std::io::Result<()> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let flow = |e: std::io::Error| std::io::Error::new(e.kind(), format!("flow {i}: {e}"));
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(flow)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(flow)?;
        stream.write_all(b"x").map_err(flow)?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).map_err(flow)?;
        held.push(stream);
    }
    println!("connected {}", held.len());
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", addr] => addr.parse().map(serve),
        ["connect", addr, n, secs] => match (n.parse(), secs.parse()) {
            (Ok(n), Ok(secs)) => addr.parse().map(|a| connect(a, n, secs)),
            _ => {
                eprintln!("idle_flows: N and SECS are numbers");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: idle_flows serve ADDR | idle_flows connect ADDR N SECS");
            return ExitCode::from(2);
        }
    };
    match parsed {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("idle_flows: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("idle_flows: bad address: {e}");
            ExitCode::from(2)
        }
    }
}
