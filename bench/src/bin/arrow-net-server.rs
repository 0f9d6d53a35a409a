//! The pod side of `arrow-net-bench`: a TCP server that echoes, sinks or
//! sources bytes, so the benchmark measures the network path and not a
//! general-purpose server's work. Built static (hack/bench-net.sh) and
//! bind-mounted into a busybox container, the same for runc and Arrow.
//!
//! `arrow-net-server PORT`; each connection starts with one command byte:
//! - `e`: echo every byte read until EOF (round-trip latency);
//! - `s`: read until EOF, then answer the byte count as 8 bytes big-endian
//!   (host → pod throughput);
//! - `g` + 8 bytes big-endian N: write N bytes, then close (pod → host
//!   throughput).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

/// Large enough that a transfer costs few system calls (each is slow in a
/// guest whose kernel is emulated).
const CHUNK: usize = 256 * 1024;

fn serve(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut command = [0u8; 1];
    conn.read_exact(&mut command)?;
    match command[0] {
        b'e' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                conn.write_all(&buf[..n])?;
            }
        }
        b's' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_all(&total.to_be_bytes())
        }
        b'g' => {
            let mut len = [0u8; 8];
            conn.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            let buf = vec![0x5au8; CHUNK];
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                conn.write_all(&buf[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown command byte {other:#04x}"),
        )),
    }
}

fn main() {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        Some(Ok(port)) => port,
        _ => {
            eprintln!("usage: arrow-net-server PORT");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("arrow-net-server: bind 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("arrow-net-server listening on 0.0.0.0:{port}");
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn) {
                        eprintln!("arrow-net-server: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("arrow-net-server: accept: {e}"),
        }
    }
}
