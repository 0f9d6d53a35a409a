//! The shim binary's lifecycle, as containerd drives it: `start` (find or
//! launch the pod's shim), the serving shim itself, and `delete` (clean up
//! after a shim that died).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{socket_address, Config, Error, Flags, StartOpts};
use oci_spec::runtime::Spec;

use crate::task::TaskService;
use arrow_runtime::network::{self, PodNetworkMode};
use arrow_runtime::spec::Role;
use arrow_runtime::vm::PodDir;

/// The runtime type containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.arrow.v1";

/// The shim process.
pub struct ArrowShim {
    namespace: String,
    id: String,
    bundle: String,
    /// containerd's address, from which the pod shim's socket is derived.
    containerd_address: String,
    /// This shim's ttrpc socket (`-socket`, only when serving).
    socket: String,
    exit: Arc<ExitSignal>,
}

fn spec_in(bundle: &Path) -> Result<Spec, Error> {
    Spec::load(bundle.join("config.json"))
        .map_err(|e| Error::InvalidArgument(format!("reading the OCI spec: {e}")))
}

/// The container's role, from the bundle's `config.json`.
fn role_in(bundle: &Path, id: &str) -> Result<Role, Error> {
    Role::of(id, &spec_in(bundle)?).map_err(|e| Error::InvalidArgument(e.to_string()))
}

#[async_trait]
impl Shim for ArrowShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ArrowShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            containerd_address: args.address.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Every container of a pod goes to the pod's one shim: the socket
    /// address is derived from the sandbox id, so the second container's
    /// `start` finds the running shim and returns its address.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let role = role_in(&bundle, &opts.id)?;
        let grouping = role.pod_id(&opts.id).to_string();
        spawn(opts, &grouping, Vec::new()).await
    }

    /// containerd calls this when the shim is gone (killed, crashed): the
    /// VMM already stopped (its lifeline closed with the shim); undo the
    /// host mounts and state of this container, and of the whole pod if
    /// this was its sandbox, including a tap and tc redirect left in the
    /// pod's network namespace (if that still exists).
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?
        } else {
            self.bundle.clone().into()
        };
        let spec = spec_in(&bundle).ok();
        let role = match spec.as_ref().map(|s| Role::of(&self.id, s)) {
            Some(Ok(role)) => role,
            Some(Err(e)) => return Err(Error::InvalidArgument(e.to_string())),
            None => Role::Standalone,
        };
        let pod = PodDir::new(&self.namespace, role.pod_id(&self.id))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let cleaned = match role {
            Role::PodMember { .. } => pod.share().remove_container(&self.id),
            Role::Sandbox | Role::Standalone => {
                let netns = spec.as_ref().map(PodNetworkMode::of);
                if let Some(PodNetworkMode::Namespace(netns)) = netns {
                    let path = netns.clone();
                    let done = tokio::task::spawn_blocking(move || network::tear_down(&path)).await;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => log::warn!("network of {}: {e}", self.id),
                        Err(e) => log::warn!("network of {}: {e}", self.id),
                    }
                }
                // The dead shim could not remove its socket.
                let socket = socket_address(&self.containerd_address, &self.namespace, &self.id);
                remove_dead_socket(&socket);
                pod.clean_up()
            }
        };
        if let Err(e) = cleaned {
            log::warn!("cleaning up {}: {e}", self.id);
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 137,
            exited_at: MessageField::some(Timestamp::from(SystemTime::now())),
            ..Default::default()
        })
    }

    /// Returns once the pod is shut down, with the socket file gone:
    /// containerd may delete the bundle (where the library looks for the
    /// address to remove) before this process gets there, and every pod
    /// would leave a file in /run/containerd/s.
    async fn wait(&mut self) {
        self.exit.wait().await;
        if !self.socket.is_empty() {
            remove_socket_file(&self.socket);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        TaskService::new(publisher, &self.namespace, self.exit.clone())
    }
}

/// The filesystem path of a `unix://` ttrpc address.
fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// Removes the socket file at `address`, if it is one (never another kind
/// of file someone put there).
fn remove_socket_file(address: &str) {
    let path = socket_path(address);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("removing the socket {}: {e}", path.display());
            }
        }
        _ => {}
    }
}

/// Removes the socket file at `address` if nothing listens on it any more.
fn remove_dead_socket(address: &str) {
    let path = socket_path(address);
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => remove_socket_file(address),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn only_sockets_nobody_serves_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let _listener = UnixListener::bind(&live).unwrap();
        // A socket bound but never listening: a listener closed here could
        // live on for a moment in a child another test forks, and answer.
        let dead = dir.path().join("dead");
        let unbound = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let address = nix::sys::socket::UnixAddr::new(&dead).unwrap();
        nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&unbound), &address).unwrap();
        drop(unbound);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"not a socket").unwrap();
        for p in [&live, &dead, &plain] {
            remove_dead_socket(&format!("unix://{}", p.display()));
        }
        assert!(live.exists(), "a served socket was removed");
        assert!(!dead.exists(), "a dead socket was kept");
        assert!(plain.exists(), "a regular file was removed");
        remove_socket_file(&format!("unix://{}", plain.display()));
        assert!(plain.exists());
        remove_socket_file(&live.display().to_string());
        assert!(!live.exists());
    }
}
