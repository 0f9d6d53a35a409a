//! The shim binary's lifecycle, as containerd drives it: `start` (find or
//! launch the pod's shim), the serving shim itself, and `delete` (clean up
//! after a shim that died).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use oci_spec::runtime::Spec;

use crate::network::{self, PodNetworkMode};
use crate::spec::Role;
use crate::task::TaskService;
use crate::vm::PodDir;

/// The runtime type containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.arrow.v1";

/// The shim process.
pub struct ArrowShim {
    namespace: String,
    id: String,
    bundle: String,
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

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        TaskService::new(publisher, &self.namespace, self.exit.clone())
    }
}
