//! The ttrpc Events service (`containerd.services.events.ttrpc.v1.Events`)
//! that the shims publish to, as they publish to containerd: arrow-cri gives
//! its socket to each shim as `TTRPC_ADDRESS`. Only what the runtime acts
//! on becomes a [`ShimEvent`]: exits (of containers and execs) and OOM kills.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{Empty, ForwardRequest};
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_events, Events};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::asynchronous::{Server, TtrpcContext};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// An event from a shim that changes what arrow-cri knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShimEvent {
    /// A container's init (empty `exec_id`) or an exec exited.
    Exit {
        container_id: String,
        exec_id: String,
        status: u32,
        /// Nanoseconds since the epoch.
        at: i64,
    },
    /// The guest kernel OOM-killed a process of this container.
    Oom { container_id: String },
}

/// Decodes one forwarded envelope's event (`type_url`, protobuf bytes).
/// Other events are `None`; an undecodable one is an error (a shim is not
/// trusted more than it must be).
pub fn decode(type_url: &str, value: &[u8]) -> Result<Option<ShimEvent>> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let bad = |e: containerd_shim_protos::protobuf::Error| {
        Error::InvalidArgument(format!("event {name}: {e}"))
    };
    Ok(match name {
        "containerd.events.TaskExit" => {
            let e = TaskExit::parse_from_bytes(value).map_err(bad)?;
            let at = e
                .exited_at
                .as_ref()
                .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
                .unwrap_or(0);
            // For an init process containerd's shims put the container id in
            // `id`; for an exec, the exec id.
            let exec_id = if e.id == e.container_id {
                String::new()
            } else {
                e.id.clone()
            };
            Some(ShimEvent::Exit {
                container_id: e.container_id,
                exec_id,
                status: e.exit_status,
                at,
            })
        }
        "containerd.events.TaskOOM" => {
            let e = TaskOOM::parse_from_bytes(value).map_err(bad)?;
            Some(ShimEvent::Oom {
                container_id: e.container_id,
            })
        }
        _ => None,
    })
}

struct Forwarder {
    tx: mpsc::UnboundedSender<ShimEvent>,
}

#[async_trait]
impl Events for Forwarder {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        if let Some(envelope) = req.envelope.as_ref() {
            if let Some(any) = envelope.event.as_ref() {
                match decode(&any.type_url, &any.value) {
                    Ok(Some(event)) => {
                        tracing::debug!(topic = %envelope.topic, ?event, "shim event");
                        let _ = self.tx.send(event);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        Ok(Empty::new())
    }
}

/// Serves the Events service on `socket` (replacing a stale one); events go
/// to `tx`. The server runs until dropped.
pub async fn serve(socket: &Path, tx: mpsc::UnboundedSender<ShimEvent>) -> Result<Server> {
    let _ = std::fs::remove_file(socket);
    let service = create_events(Arc::new(Forwarder { tx }));
    let address = format!("unix://{}", socket.display());
    let mut server = Server::new()
        .bind(&address)
        .map_err(|e| Error::Internal(format!("binding {address}: {e}")))?
        .register_service(service);
    server
        .start()
        .await
        .map_err(|e| Error::Internal(format!("serving events on {address}: {e}")))?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
    use containerd_shim_protos::protobuf::MessageField;

    #[test]
    fn exits_and_ooms_decode_and_garbage_is_refused() {
        let exit = TaskExit {
            container_id: "c".into(),
            id: "c".into(),
            pid: 7,
            exit_status: 137,
            exited_at: MessageField::some(Timestamp {
                seconds: 2,
                nanos: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = exit.write_to_bytes().unwrap();
        assert_eq!(
            decode("containerd.events.TaskExit", &bytes).unwrap(),
            Some(ShimEvent::Exit {
                container_id: "c".into(),
                exec_id: String::new(),
                status: 137,
                at: 2_000_000_005,
            })
        );
        let exec = TaskExit {
            container_id: "c".into(),
            id: "e1".into(),
            ..Default::default()
        };
        let bytes = exec.write_to_bytes().unwrap();
        assert!(matches!(
            decode("containerd.events.TaskExit", &bytes).unwrap(),
            Some(ShimEvent::Exit { exec_id, .. }) if exec_id == "e1"
        ));
        let oom = TaskOOM {
            container_id: "c".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(
                "type.googleapis.com/containerd.events.TaskOOM",
                &oom.write_to_bytes().unwrap()
            )
            .unwrap(),
            Some(ShimEvent::Oom {
                container_id: "c".into()
            })
        );
        assert_eq!(decode("containerd.events.TaskStart", b"").unwrap(), None);
        assert!(decode("containerd.events.TaskExit", &[0xff, 0xff, 0xff]).is_err());
    }
}
