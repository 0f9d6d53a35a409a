//! `kubectl port-forward` to an arrow pod under containerd.
//!
//! containerd's CRI plugin forwards a port itself: it dials
//! `127.0.0.1:<port>` inside the pod's network namespace on the host, where,
//! with Arrow, nothing listens (the pod's programs run in the guest). So the
//! runtime listens on one loopback port of that namespace, and an iptables
//! `REDIRECT` rule there (locally generated TCP to 127.0.0.1, chain `nat
//! OUTPUT`) sends every such connection to it. For each connection the runtime
//! reads the port the client meant (`SO_ORIGINAL_DST`) and carries the bytes
//! over a vsock stream to the guest agent, which connects to
//! `127.0.0.1:<port>` in the guest (`proto::FORWARD_PORT`).
//!
//! Nothing of this is reachable from the guest: its frames go from the tap
//! straight to the pod's veth (tc redirect), never into the namespace's IP
//! stack, and a packet to 127.0.0.1 from outside is a martian. The rule and
//! the listener live in the pod's namespace and go with it; the accept loop
//! ends when the VM does.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::command::Ran;
use crate::exits::ChildExits;
use crate::network::{self, NetworkError};
use crate::vm::PodVm;

/// How long the guest may take to answer a port-forward open: generous,
/// because a guest whose kernel is emulated (kvm_pvm) and busy carrying
/// other forwards answers late (seen: > 10 s beside three 4 MiB
/// transfers); the client's connection waits at most this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The comment on the redirect rule, so an operator can tell what made it.
const RULE_COMMENT: &str = "arrow: kubectl port-forward to the pod's microVM";
/// Buffer of each direction's copy.
const COPY_BUF: usize = 32 * 1024;

/// The listening end of port-forward in a pod's network namespace.
#[derive(Debug)]
pub struct Loopback {
    listener: TcpListener,
}

impl Loopback {
    /// Binds 127.0.0.1:0 in `netns` and redirects every TCP connection to
    /// 127.0.0.1 made in that namespace to it (iptables, whose exit comes
    /// from `exits`, see [`crate::command`]).
    pub async fn listen(netns: &Path, exits: &dyn ChildExits) -> Result<Self, NetworkError> {
        let exit = exits
            .listen()
            .await
            .map_err(|source| NetworkError::PortForward {
                what: "listening for iptables' exit".into(),
                source,
            })?;
        let path = netns.to_path_buf();
        let bound = tokio::task::spawn_blocking(move || {
            network::in_netns(&path, false, || {
                let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| {
                    NetworkError::PortForward {
                        what: "binding 127.0.0.1:0".into(),
                        source,
                    }
                })?;
                let port = listener
                    .local_addr()
                    .map_err(|source| NetworkError::PortForward {
                        what: "reading the listener's port".into(),
                        source,
                    })?
                    .port();
                // Spawned from this thread, so iptables runs in the namespace.
                let args = redirect_args(port);
                let ran = Ran::spawn_and_read(Command::new("iptables").args(&args)).map_err(
                    |source| NetworkError::PortForward {
                        what: "running iptables (is it installed?)".into(),
                        source,
                    },
                )?;
                Ok((listener, args, ran))
            })
        })
        .await
        .map_err(|e| NetworkError::Thread(e.to_string()))??;
        let (listener, args, ran) =
            bound.ok_or_else(|| NetworkError::Thread("network namespace missing".into()))?;
        let out = ran.finish(exit).await;
        if !out.success() {
            return Err(NetworkError::PortForward {
                what: format!(
                    "iptables {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: io::Error::other(format!("iptables exited with {}", out.code)),
            });
        }
        Ok(Self { listener })
    }

    /// The port the runtime listens on (in the pod's namespace).
    pub fn port(&self) -> io::Result<u16> {
        Ok(self.listener.local_addr()?.port())
    }

    /// Serves connections until `vm` exits; holds no reference that keeps
    /// the VM's state alive beyond that.
    pub fn serve(self, vm: &Arc<PodVm>, pod_id: &str) -> Result<(), NetworkError> {
        let listener = self
            .listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(self.listener))
            .map_err(|source| NetworkError::PortForward {
                what: "serving the listener".into(),
                source,
            })?;
        let exited = vm_exited(vm.exit_watch());
        let vm = Arc::downgrade(vm);
        let pod_id = pod_id.to_string();
        tokio::spawn(async move {
            tokio::pin!(exited);
            loop {
                tokio::select! {
                    () = &mut exited => break,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => {
                            let vm = Weak::clone(&vm);
                            let pod_id = pod_id.clone();
                            tokio::task::spawn_blocking(move || {
                                forward_connection(client, &vm, &pod_id)
                            });
                        }
                        Err(e) => {
                            // Out of fds and the like: pause, do not spin.
                            log::warn!("pod {pod_id}: port-forward accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        });
        Ok(())
    }
}

/// Resolves once the VMM exited (or its watch is gone).
async fn vm_exited(mut exit: tokio::sync::watch::Receiver<Option<i32>>) {
    let _ = exit.wait_for(Option::is_some).await.map(|_| ());
}

/// iptables' arguments that append the REDIRECT rule to `port`.
fn redirect_args(port: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-o",
        "lo",
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "REDIRECT",
        "--to-ports",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(port.to_string());
    args
}

/// One forwarded connection: the port the client meant, a stream to it in
/// the guest, and the bytes both ways. A failure resets the client, as a
/// refused connection would.
fn forward_connection(client: tokio::net::TcpStream, vm: &Weak<PodVm>, pod_id: &str) {
    let client = match client.into_std().and_then(|c| {
        c.set_nonblocking(false)?;
        Ok(c)
    }) {
        Ok(client) => client,
        Err(e) => {
            log::warn!("pod {pod_id}: port-forward connection: {e}");
            return;
        }
    };
    let port = match original_port(&client) {
        Ok(port) => port,
        Err(e) => {
            log::warn!("pod {pod_id}: port-forward: the connection's original port: {e}");
            reset(client);
            return;
        }
    };
    let Some(vm) = vm.upgrade() else {
        reset(client);
        return;
    };
    let guest = match vm.port_forward(port, OPEN_TIMEOUT) {
        Ok(guest) => guest,
        Err(e) => {
            log::info!("pod {pod_id}: port-forward to port {port}: {e}");
            reset(client);
            return;
        }
    };
    // The stream is shut down with the VM; this function holds no more.
    drop(vm);
    let _ = client.set_nodelay(true);
    relay(&client, guest);
}

/// The destination the client dialled, before the REDIRECT.
fn original_port(client: &TcpStream) -> io::Result<u16> {
    let addr = nix::sys::socket::getsockopt(client, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    Ok(u16::from_be(addr.sin_port))
}

/// Closes `client` with a reset (SO_LINGER 0), so the far side sees a
/// connection that failed rather than one that ended.
fn reset(client: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &linger);
}

/// Bytes both ways until both directions ended: client -> guest on a second
/// thread, guest -> client on this one. An end of stream is passed on as a
/// half-close; an error ends both directions.
fn relay(client: &TcpStream, guest: crate::stdio::GuestStream) {
    let abort = || {
        let _ = client.shutdown(Shutdown::Both);
        let _ = guest.shutdown(Shutdown::Both);
    };
    std::thread::scope(|scope| {
        let upstream = std::thread::Builder::new()
            .name("forward-up".into())
            .spawn_scoped(scope, || match pump(client, &guest) {
                Ok(()) => {
                    let _ = guest.shutdown(Shutdown::Write);
                }
                Err(e) => {
                    log::debug!("port-forward client -> guest: {e}");
                    abort();
                }
            });
        if let Err(e) = upstream {
            log::warn!("port-forward: cannot start a copy thread: {e}");
            abort();
            return;
        }
        match pump(&guest, client) {
            Ok(()) => {
                let _ = client.shutdown(Shutdown::Write);
            }
            Err(e) => {
                log::debug!("port-forward guest -> client: {e}");
                abort();
            }
        }
    });
}

/// Copies `src` to `dst` until `src` ends.
fn pump(mut src: impl Read, mut dst: impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => dst.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A named network namespace made with ip(8), deleted on drop.
    struct TestNetns(String);

    impl TestNetns {
        fn new(tag: &str) -> Option<Self> {
            let name = format!("arrow-pf-{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Self(name))
        }
        fn path(&self) -> std::path::PathBuf {
            Path::new("/run/netns").join(&self.0)
        }
        fn run(&self, args: &[&str]) -> std::process::Output {
            Command::new("ip")
                .args(["netns", "exec", &self.0])
                .args(args)
                .output()
                .unwrap()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// The listener and the rule, in a real namespace: a connection to any
    /// loopback port there reaches the listener, which learns the port.
    #[tokio::test]
    async fn loopback_connections_in_the_namespace_reach_the_listener() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (network namespaces, iptables)");
            return;
        }
        let Some(ns) = TestNetns::new("redirect") else {
            eprintln!("skipped: ip netns add failed");
            return;
        };
        assert!(ns.run(&["ip", "link", "set", "lo", "up"]).status.success());
        let loopback = Loopback::listen(&ns.path(), &crate::exits::OwnChildren)
            .await
            .unwrap();
        let listen_port = loopback.port().unwrap();
        let rules = ns.run(&["iptables", "-t", "nat", "-S", "OUTPUT"]);
        let rules = String::from_utf8_lossy(&rules.stdout).to_string();
        assert!(
            rules.contains(&format!("--to-ports {listen_port}")),
            "{rules}"
        );
        // A client in the namespace dials port 8080, where nothing listens.
        let client = std::thread::spawn({
            let path = ns.path();
            move || {
                network::in_netns(&path, false, || {
                    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, 8080)).map_err(|e| {
                        NetworkError::PortForward {
                            what: "test connect".into(),
                            source: e,
                        }
                    })?;
                    s.write_all(b"hello").unwrap();
                    Ok(())
                })
                .unwrap()
            }
        });
        let (mut accepted, _) = loopback.listener.accept().unwrap();
        assert_eq!(original_port(&accepted).unwrap(), 8080);
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        client.join().unwrap();
    }

    #[test]
    fn pump_copies_until_the_end() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        pump(&data[..], &mut out).unwrap();
        assert_eq!(out, data);
    }
}
