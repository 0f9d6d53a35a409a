//! The streaming server's HTTP side: `/{exec,attach,portforward}/<token>`,
//! each token good once, upgraded to SPDY/3.1 (`X-Stream-Protocol-Version`
//! negotiated as kubelet's `httpstream.Handshake` does: the client's first
//! protocol the server has) or to a WebSocket (`Sec-WebSocket-Protocol`
//! likewise; for port-forward also SPDY tunnelled in WebSocket binary
//! messages, `SPDY/3.1+portforward.k8s.io`, which newer clients prefer).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::tokens::TokenCache;
use super::{netns, portforward, remotecommand, websocket, Session, StreamRequest, StreamTarget};
use crate::runtime::Runtime;

/// The SPDY sub-protocol header (kubelet's `httpstream.HeaderProtocolVersion`).
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";

/// Port-forward's SPDY carried in WebSocket binary messages.
pub const TUNNELED_PORT_FORWARD: &str = "SPDY/3.1+portforward.k8s.io";

/// Binds `address` and serves in the background; returns the bound address.
pub async fn serve(
    address: &str,
    tokens: Arc<TokenCache<StreamRequest>>,
    runtime: Arc<Runtime>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the streaming server to {address}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("streaming server: accepting: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tokens, runtime) = (tokens.clone(), runtime.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    handle(req, tokens.clone(), runtime.clone())
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    tracing::debug!("streaming connection: {e}");
                }
            });
        }
    });
    Ok(local)
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, message: impl Into<String>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(message.into() + "\n")));
    *r.status_mut() = status;
    r
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Every value of a header that may be repeated or comma-separated.
fn header_values(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    tokens: Arc<TokenCache<StreamRequest>>,
    runtime: Arc<Runtime>,
) -> Result<Reply, Infallible> {
    Ok(route(req, &tokens, runtime).await)
}

async fn route(
    req: Request<Incoming>,
    tokens: &TokenCache<StreamRequest>,
    runtime: Arc<Runtime>,
) -> Reply {
    let path = req.uri().path().trim_start_matches('/').to_string();
    let Some((kind, token)) = path.split_once('/') else {
        return reply(StatusCode::NOT_FOUND, "not found");
    };
    if !matches!(kind, "exec" | "attach" | "portforward") {
        return reply(StatusCode::NOT_FOUND, "not found");
    }
    let Some(request) = tokens.take(token) else {
        return reply(
            StatusCode::NOT_FOUND,
            "unknown, used or expired streaming token: ask the runtime for a new URL",
        );
    };
    if request.kind() != kind {
        return reply(StatusCode::NOT_FOUND, "not found");
    }
    let upgrade = header(&req, "upgrade").unwrap_or("").to_ascii_lowercase();
    if upgrade == "websocket" {
        upgrade_websocket(req, request, runtime).await
    } else if upgrade.starts_with("spdy/3.1") {
        upgrade_spdy(req, request, runtime).await
    } else {
        reply(
            StatusCode::BAD_REQUEST,
            "streaming needs a connection upgrade to SPDY/3.1 or WebSocket",
        )
    }
}

/// What serves a request once its protocol is chosen.
enum Served {
    RemoteCommand(Session),
    PortForward(portforward::Dialer, Vec<u16>),
}

async fn served(request: StreamRequest, runtime: Arc<Runtime>) -> Result<Served, Reply> {
    Ok(match request {
        StreamRequest::Exec {
            container_id,
            options,
        } => Served::RemoteCommand(Session {
            target: StreamTarget::Exec {
                container_id,
                options,
            },
            runtime,
        }),
        StreamRequest::Attach {
            container_id,
            options,
        } => Served::RemoteCommand(Session {
            target: StreamTarget::Attach {
                container_id,
                options,
            },
            runtime,
        }),
        StreamRequest::PortForward { pod_id, ports } => {
            let pod = runtime
                .pod(&pod_id)
                .await
                .map_err(|e| reply(StatusCode::NOT_FOUND, e.to_string()))?;
            let Some(ns) = pod.netns.clone() else {
                return Err(reply(
                    StatusCode::BAD_REQUEST,
                    format!("pod {pod_id} has no network namespace to forward into"),
                ));
            };
            let dialer: portforward::Dialer = Arc::new(move |port| {
                let ns = ns.clone();
                Box::pin(async move { netns::dial_loopback(ns, port).await })
            });
            Served::PortForward(dialer, ports)
        }
    })
}

async fn upgrade_spdy(
    req: Request<Incoming>,
    request: StreamRequest,
    runtime: Arc<Runtime>,
) -> Reply {
    let offered = header_values(&req, PROTOCOL_HEADER);
    let served_protocols: &[&'static str] = match request {
        StreamRequest::PortForward { .. } => &[portforward::PROTOCOL],
        _ => remotecommand::PROTOCOLS,
    };
    let Some(protocol) = offered
        .iter()
        .find_map(|p| served_protocols.iter().find(|s| **s == p).copied())
    else {
        let mut r = reply(
            StatusCode::FORBIDDEN,
            format!(
                "no supported {PROTOCOL_HEADER} among {offered:?}: this server has {served_protocols:?}"
            ),
        );
        for p in served_protocols {
            r.headers_mut().append(
                "X-Accepted-Stream-Protocol-Versions",
                HeaderValue::from_static(p),
            );
        }
        return r;
    };
    let handler = match served(request, runtime).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                tracing::debug!("SPDY upgrade: {e}");
                return;
            }
        };
        match handler {
            Served::RemoteCommand(session) => remotecommand::serve(io, protocol, session).await,
            Served::PortForward(dial, _) => portforward::serve(io, dial).await,
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    r
}

async fn upgrade_websocket(
    req: Request<Incoming>,
    request: StreamRequest,
    runtime: Arc<Runtime>,
) -> Reply {
    let Some(key) = header(&req, "sec-websocket-key") else {
        return reply(
            StatusCode::BAD_REQUEST,
            "WebSocket upgrade without Sec-WebSocket-Key",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered = header_values(&req, "sec-websocket-protocol").join(",");
    let protocol = match request {
        StreamRequest::PortForward { .. } => {
            let mut served = vec![TUNNELED_PORT_FORWARD];
            served.extend_from_slice(websocket::PORT_FORWARD_PROTOCOLS);
            websocket::choose_protocol(&offered, &served)
        }
        _ => websocket::choose_protocol(&offered, websocket::EXEC_PROTOCOLS),
    };
    let Some(protocol) = protocol else {
        return reply(
            StatusCode::BAD_REQUEST,
            format!("no supported WebSocket sub-protocol among {offered:?}"),
        );
    };
    let handler = match served(request, runtime).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                tracing::debug!("WebSocket upgrade: {e}");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        match handler {
            Served::RemoteCommand(session) => {
                websocket::serve_remote_command(ws, protocol, session).await
            }
            Served::PortForward(dial, _) if protocol == TUNNELED_PORT_FORWARD => {
                portforward::serve(websocket::tunnel(ws), dial).await
            }
            Served::PortForward(dial, ports) => {
                websocket::serve_port_forward(ws, protocol, ports, dial).await
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("Sec-WebSocket-Accept", v);
    }
    h.insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    r
}
