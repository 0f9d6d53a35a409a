//! Connections into a pod's network namespace: port-forward dials
//! `127.0.0.1:<port>` there, as containerd's CRI plugin does. In an Arrow
//! pod nothing listens there itself: the shim's redirect in that namespace
//! takes the connection to the guest over vsock.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

/// How long a connection to the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `127.0.0.1:port` inside the network namespace `netns`.
/// The error is the message the client is shown.
pub async fn dial_loopback(netns: PathBuf, port: u16) -> Result<tokio::net::TcpStream, String> {
    let stream = tokio::task::spawn_blocking(move || dial_in(&netns, port))
        .await
        .map_err(|e| format!("dialing port {port}: {e}"))??;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("port {port}: {e}"))?;
    tokio::net::TcpStream::from_std(stream).map_err(|e| format!("port {port}: {e}"))
}

fn dial_in(netns: &std::path::Path, port: u16) -> Result<TcpStream, String> {
    let ns = File::open(netns).map_err(|e| {
        format!(
            "opening the pod's network namespace {}: {e}",
            netns.display()
        )
    })?;
    // A thread of its own enters the namespace; the socket stays there
    // after the thread (and its namespace) is gone.
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering {}: {e}", netns.display()))?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .map_err(|e| format!("dial tcp {addr}: connect: {e}"))
        })
        .join()
        .map_err(|_| "the dialing thread failed".to_string())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dials_in_its_own_namespace_and_reports_refusals() {
        // This process's own namespace stands in for a pod's.
        let own = PathBuf::from("/proc/self/ns/net");
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conn = dial_loopback(own.clone(), port).await;
        if let Err(e) = &conn {
            // setns needs CAP_SYS_ADMIN: without it, say so and stop.
            assert!(e.contains("entering"), "{e}");
            return;
        }
        drop(listener);
        let refused = dial_loopback(own, port).await.unwrap_err();
        assert!(
            refused.contains("connection refused") || refused.contains("Connection refused"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_missing_namespace_is_an_error() {
        let e = dial_loopback("/nonexistent/netns".into(), 80)
            .await
            .unwrap_err();
        assert!(e.contains("/nonexistent/netns"), "{e}");
    }
}
