//! Port-forward over SPDY (`portforward.k8s.io`), as kubelet serves it: for
//! each connection the client opens two streams with the same `requestid`
//! header, `streamtype: error` and `streamtype: data`, both naming the
//! `port`. Once both are in, the port is dialled in the pod; the data
//! stream carries the connection's bytes both ways and a failure is
//! written to the error stream as text. Any number of connections, to any
//! number of ports, share one session.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::spdy::{Role, SpdySession, SpdyStream};

/// The SPDY sub-protocol.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// How long the first stream of a pair waits for the second (kubelet's
/// stream creation timeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections not yet paired at most; a client opening more is cut off.
const MAX_PENDING_PAIRS: usize = 1024;

/// Connects to a port of the pod; the error is shown to the client.
pub type Dialer = Arc<
    dyn Fn(u16) -> Pin<Box<dyn Future<Output = Result<TcpStream, String>> + Send>> + Send + Sync,
>;

#[derive(Default)]
struct Pair {
    data: Option<SpdyStream>,
    error: Option<SpdyStream>,
    since: Option<tokio::time::Instant>,
}

/// Serves one port-forward session on `io` until the client hangs up.
pub async fn serve<T>(io: T, dial: Dialer)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (session, mut incoming) = SpdySession::start(io, Role::Server);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sweep.tick() => {
                // A stream whose partner never came is dropped (reset).
                let now = tokio::time::Instant::now();
                pairs.retain(|_, p| p.since.is_some_and(|t| now.duration_since(t) < PAIR_TIMEOUT));
                continue;
            }
        };
        let (Some(id), Some(kind)) = (
            stream.header("requestid").map(str::to_string),
            stream.header("streamtype").map(str::to_string),
        ) else {
            tracing::debug!("port-forward: a stream without requestid or streamtype");
            stream.reset();
            continue;
        };
        if !pairs.contains_key(&id) && pairs.len() >= MAX_PENDING_PAIRS {
            stream.reset();
            continue;
        }
        let pair = pairs.entry(id.clone()).or_default();
        pair.since.get_or_insert_with(tokio::time::Instant::now);
        match kind.as_str() {
            "data" if pair.data.is_none() => pair.data = Some(stream),
            "error" if pair.error.is_none() => pair.error = Some(stream),
            _ => {
                stream.reset();
                continue;
            }
        }
        if pair.data.is_some() && pair.error.is_some() {
            if let Some(Pair {
                data: Some(data),
                error: Some(error),
                ..
            }) = pairs.remove(&id)
            {
                tokio::spawn(forward(data, error, dial.clone()));
            }
        }
    }
    session.close().await;
}

/// One forwarded connection.
async fn forward(data: SpdyStream, mut error: SpdyStream, dial: Dialer) {
    let port = data.header("port").and_then(|p| p.parse::<u16>().ok());
    let result = match port {
        None | Some(0) => Err(format!(
            "invalid port {:?} in the data stream",
            data.header("port").unwrap_or("")
        )),
        Some(port) => match dial(port).await {
            Ok(conn) => copy_both_ways(conn, data)
                .await
                .map_err(|why| format!("error forwarding port {port} to pod: {why}")),
            Err(why) => Err(format!("error forwarding port {port} to pod: {why}")),
        },
    };
    if let Err(message) = result {
        tracing::debug!("port-forward: {message}");
        let _ = error.write_all(message.as_bytes()).await;
    }
    let _ = error.shutdown().await;
}

/// Copies until both directions ended: the client's end of its data
/// half-closes the connection, the pod's end half-closes the stream. A
/// connection the pod refused is an error for the error stream.
async fn copy_both_ways(conn: TcpStream, data: SpdyStream) -> Result<(), String> {
    let (mut conn_rd, mut conn_wr) = conn.into_split();
    let (mut data_rd, mut data_wr) = tokio::io::split(data);
    let up = async {
        let _ = tokio::io::copy(&mut data_rd, &mut conn_wr).await;
        let _ = conn_wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut carried = 0u64;
        let result = loop {
            match conn_rd.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    carried += n as u64;
                    if data_wr.write_all(&buf[..n]).await.is_err() {
                        break Ok(());
                    }
                }
                Err(e) => break refused(&e, carried).map_or(Ok(()), Err),
            }
        };
        let _ = data_wr.shutdown().await;
        result
    };
    let ((), result) = tokio::join!(up, down);
    result
}

/// The message for a connection reset before the pod sent anything: in an
/// Arrow pod the shim accepts every connection to the pod's loopback and
/// resets it when nothing listens on that port in the guest, so this is
/// the "connection refused" of a runc pod.
pub(super) fn refused(e: &std::io::Error, carried: u64) -> Option<String> {
    (carried == 0 && e.kind() == std::io::ErrorKind::ConnectionReset).then(|| {
        "connection refused: nothing accepted the connection in the pod (reset by peer)".to_string()
    })
}
