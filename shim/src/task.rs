//! The shim v2 Task service: containerd's ttrpc calls for the pod this
//! shim serves, translated to the pod runtime ([`arrow_runtime::pod`]) and
//! back. Everything containerd-specific happens here and nowhere else: its
//! request and response messages, its status codes (one mapping,
//! [`runtime_status`]), its task events (one mapping, [`task_event`]), its
//! process states and its metrics encoding ([`crate::stats`]).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    Empty, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, Task, TtrpcContext, TtrpcResult};
use tokio::sync::mpsc;

use crate::reaper::ReaperExits;
use crate::stats;
use arrow_runtime::error::{ErrorKind, RuntimeError};
use arrow_runtime::events::PodEvent;
use arrow_runtime::pod::{CreateRequest, ExecRequest, PodRuntime};
use arrow_runtime::process::{ProcessState, StdioPaths};
use arrow_runtime::share::RootfsMount;

/// A ttrpc status containerd sees.
fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// The runtime's error as containerd's status code.
fn runtime_status(err: RuntimeError) -> ttrpc::Error {
    let code = match err.kind {
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::Unavailable => Code::UNAVAILABLE,
        ErrorKind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        ErrorKind::Unimplemented => Code::UNIMPLEMENTED,
        ErrorKind::Internal => Code::INTERNAL,
    };
    status(code, err.message)
}

/// The runtime's process state as containerd's.
fn task_status(state: ProcessState) -> Status {
    match state {
        ProcessState::Created => Status::CREATED,
        ProcessState::Running => Status::RUNNING,
        ProcessState::Paused => Status::PAUSED,
        ProcessState::Stopped => Status::STOPPED,
    }
}

fn timestamp(at: std::time::SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(at))
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_string(),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        terminal,
    }
}

/// A runtime event as containerd's task event and its topic.
fn task_event(event: PodEvent) -> (&'static str, Box<dyn MessageDyn>) {
    match event {
        PodEvent::Created {
            container_id,
            bundle,
            rootfs,
            stdio,
            pid,
        } => (
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id,
                bundle,
                rootfs: rootfs
                    .into_iter()
                    .map(|m| Mount {
                        type_: m.kind,
                        source: m.source,
                        options: m.options,
                        ..Default::default()
                    })
                    .collect(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        ),
        PodEvent::Started { container_id, pid } => (
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id,
                pid,
                ..Default::default()
            }),
        ),
        PodEvent::ExecAdded {
            container_id,
            exec_id,
        } => (
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id,
                exec_id,
                ..Default::default()
            }),
        ),
        PodEvent::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => (
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id,
                exec_id,
                pid,
                ..Default::default()
            }),
        ),
        PodEvent::Exited {
            container_id,
            id,
            pid,
            exit,
        } => (
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id,
                id,
                pid,
                exit_status: exit.status,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        ),
        PodEvent::Deleted {
            container_id,
            pid,
            exit,
        } => (
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                id: container_id.clone(),
                container_id,
                pid,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
                ..Default::default()
            }),
        ),
        PodEvent::Paused { container_id } => (
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id,
                ..Default::default()
            }),
        ),
        PodEvent::Resumed { container_id } => (
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id,
                ..Default::default()
            }),
        ),
        PodEvent::OutOfMemory { container_id } => (
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id,
                ..Default::default()
            }),
        ),
    }
}

/// Publishes the runtime's events to containerd, in order, until the
/// runtime is gone.
async fn publish_events(
    mut events: mpsc::UnboundedReceiver<PodEvent>,
    publisher: RemotePublisher,
    namespace: String,
) {
    while let Some(event) = events.recv().await {
        let (topic, message) = task_event(event);
        if let Err(e) = publisher
            .publish(Context::default(), topic, &namespace, message)
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }
}

fn any_json(any: &MessageField<Any>, what: &str) -> TtrpcResult<Vec<u8>> {
    any.as_ref()
        .map(|a| a.value.clone())
        .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("{what} is missing")))
}

/// The Task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    runtime: PodRuntime,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    /// Must be called on the shim's async runtime (it starts the task that
    /// publishes events).
    pub fn new(publisher: RemotePublisher, namespace: &str, exit: Arc<ExitSignal>) -> Self {
        let (events, received) = mpsc::unbounded_channel();
        tokio::spawn(publish_events(received, publisher, namespace.to_string()));
        TaskService {
            runtime: PodRuntime::new(namespace, events, Arc::new(ReaperExits)),
            exit,
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "restoring a container from a checkpoint is not supported by Arrow",
            ));
        }
        let request = CreateRequest {
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            id: req.id,
            bundle: req.bundle,
        };
        let pid = self.runtime.create(request).await.map_err(runtime_status)?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self
            .runtime
            .start(&req.id, &req.exec_id)
            .await
            .map_err(runtime_status)?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let deleted = self
            .runtime
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(runtime_status)?;
        Ok(api::DeleteResponse {
            pid: deleted.pid,
            exit_status: deleted.exit.map(|e| e.status).unwrap_or(0),
            exited_at: deleted.exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pids = self.runtime.pids(&req.id).await.map_err(runtime_status)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.runtime.pause(&req.id).await.map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.runtime.resume(&req.id).await.map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpointing a container is not supported by Arrow",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.runtime
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let process_json = any_json(&req.spec, "the exec process spec")?;
        let request = ExecRequest {
            stdio: stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            container_id: req.id,
            exec_id: req.exec_id,
            process_json,
        };
        self.runtime.exec(request).await.map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.runtime
            .resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.runtime
                .close_stdin(&req.id, &req.exec_id)
                .await
                .map_err(runtime_status)?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let json = any_json(&req.resources, "resources")?;
        self.runtime
            .update(&req.id, &json)
            .await
            .map_err(runtime_status)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exit = self
            .runtime
            .wait(&req.id, &req.exec_id)
            .await
            .map_err(runtime_status)?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let all = self.runtime.stats(&req.id).await.map_err(runtime_status)?;
        let any = stats::encode(&stats::metrics(&all))
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.runtime.init_pid(&req.id).await,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.runtime.shutdown().await {
            self.exit.signal();
        }
        Ok(Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let p = self
            .runtime
            .state(&req.id, &req.exec_id)
            .await
            .map_err(runtime_status)?;
        Ok(StateResponse {
            id: p.id,
            bundle: p.bundle,
            pid: p.pid,
            status: task_status(p.state).into(),
            stdin: p.stdio.stdin,
            stdout: p.stdio.stdout,
            stderr: p.stdio.stderr,
            terminal: p.stdio.terminal,
            exit_status: p.exit.map(|e| e.status).unwrap_or(0),
            exited_at: p.exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_runtime::process::Exit;

    #[test]
    fn runtime_errors_keep_their_kind_and_message() {
        let err = runtime_status(RuntimeError::new(
            ErrorKind::NotFound,
            "container x not found",
        ));
        let ttrpc::Error::RpcStatus(s) = err else {
            panic!("not a status: {err:?}");
        };
        assert_eq!(s.code(), Code::NOT_FOUND);
        assert_eq!(s.message(), "container x not found");
        let ttrpc::Error::RpcStatus(s) = runtime_status(RuntimeError::new(
            ErrorKind::Unimplemented,
            "pausing a whole pod",
        )) else {
            panic!("not a status");
        };
        assert_eq!(s.code(), Code::UNIMPLEMENTED);
    }

    #[test]
    fn exits_and_deletes_become_task_events_with_their_status() {
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7);
        let exit = Exit { status: 137, at };
        let (topic, message) = task_event(PodEvent::Exited {
            container_id: "c".into(),
            id: "e".into(),
            pid: 42,
            exit,
        });
        assert_eq!(topic, topics::TASK_EXIT_EVENT_TOPIC);
        let exit_event = message
            .downcast_box::<TaskExit>()
            .unwrap_or_else(|_| panic!("not a TaskExit"));
        assert_eq!(
            (exit_event.container_id.as_str(), exit_event.id.as_str()),
            ("c", "e")
        );
        assert_eq!((exit_event.pid, exit_event.exit_status), (42, 137));
        assert_eq!(exit_event.exited_at.seconds, 7);

        let (topic, message) = task_event(PodEvent::Deleted {
            container_id: "c".into(),
            pid: 42,
            exit: None,
        });
        assert_eq!(topic, topics::TASK_DELETE_EVENT_TOPIC);
        let deleted = message
            .downcast_box::<TaskDelete>()
            .unwrap_or_else(|_| panic!("not a TaskDelete"));
        assert_eq!((deleted.id.as_str(), deleted.exit_status), ("c", 0));
    }

    #[test]
    fn process_states_are_containerds() {
        assert_eq!(task_status(ProcessState::Created), Status::CREATED);
        assert_eq!(task_status(ProcessState::Paused), Status::PAUSED);
        assert_eq!(task_status(ProcessState::Stopped), Status::STOPPED);
    }
}
