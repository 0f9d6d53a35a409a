//! The streaming server: `kubectl exec`/`attach`/`port-forward` and
//! `crictl exec -it`/`attach`/`port-forward` do not go over CRI gRPC. Exec,
//! Attach and PortForward return a single-use URL ([`tokens`]); the client
//! (kubelet, or crictl itself) connects there and upgrades the HTTP
//! connection to SPDY/3.1 ([`spdy`], served by [`remotecommand`] and
//! [`portforward`]) or to a WebSocket ([`websocket`]), as kubelet's own
//! streaming library serves them.
//!
//! Exec and attach run through the pod's shim like any exec
//! ([`crate::runtime::exec`]); port-forward dials `127.0.0.1:<port>` in the
//! pod's network namespace, where the shim's redirect carries the
//! connection over vsock to the guest, where the pod's programs listen.

pub mod http;
pub mod netns;
pub mod portforward;
pub mod remotecommand;
pub mod spdy;
pub mod status;
pub mod tokens;
pub mod websocket;

use std::sync::Arc;

use crate::error::Result;
use crate::runtime::exec::{ExecIo, ExecOptions, ExecOutcome};
use crate::runtime::Runtime;

/// A stream a client was given a URL for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    Exec {
        container_id: String,
        options: ExecOptions,
    },
    Attach {
        container_id: String,
        /// `cmd` is unused.
        options: ExecOptions,
    },
    PortForward {
        pod_id: String,
        /// The ports the request named (WebSocket clients get one
        /// connection to each; SPDY clients name a port per stream).
        ports: Vec<u16>,
    },
}

impl StreamRequest {
    /// The URL path's first segment.
    fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Exec { .. } => "exec",
            StreamRequest::Attach { .. } => "attach",
            StreamRequest::PortForward { .. } => "portforward",
        }
    }
}

/// An exec or attach being served, whatever the protocol.
pub struct Session {
    pub target: StreamTarget,
    pub runtime: Arc<Runtime>,
}

/// What an exec or attach session runs.
pub enum StreamTarget {
    Exec {
        container_id: String,
        options: ExecOptions,
    },
    Attach {
        container_id: String,
        options: ExecOptions,
    },
}

impl StreamTarget {
    /// The streams the client asked for.
    pub fn stdio(&self) -> &ExecOptions {
        match self {
            StreamTarget::Exec { options, .. } | StreamTarget::Attach { options, .. } => options,
        }
    }

    pub async fn run(&self, runtime: &Runtime, io: ExecIo) -> ExecOutcome {
        match self {
            StreamTarget::Exec {
                container_id,
                options,
            } => runtime.exec_streaming(container_id, options, io).await,
            StreamTarget::Attach {
                container_id,
                options,
            } => runtime.attach_streaming(container_id, options, io).await,
        }
    }
}

/// The server's address and its pending requests.
pub struct StreamingServer {
    base_url: String,
    tokens: Arc<tokens::TokenCache<StreamRequest>>,
}

impl StreamingServer {
    /// Serves on `address` (`host:port`; port 0 picks one) until the
    /// process ends.
    pub async fn start(address: &str, runtime: Arc<Runtime>) -> anyhow::Result<StreamingServer> {
        let tokens = Arc::new(tokens::TokenCache::new(tokens::TOKEN_TTL));
        let local = http::serve(address, tokens.clone(), runtime).await?;
        Ok(StreamingServer {
            base_url: format!("http://{local}"),
            tokens,
        })
    }

    /// The single-use URL that serves `request`.
    pub fn url(&self, request: StreamRequest) -> Result<String> {
        let kind = request.kind();
        let token = self.tokens.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }
}
