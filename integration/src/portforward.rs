//! A client of Kubernetes' port-forward streams over WebSocket, as kubectl
//! speaks them to a CRI streaming server (containerd's, kubelet's): the URL
//! `PortForward` returned, `?port=<p>`, sub-protocol `v4.channel.k8s.io`.
//! Each port gets two channels, data (0) and error (1); every message is
//! one channel byte then payload, and the server opens each channel with
//! the port as two little-endian bytes.

use std::io;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

/// The sub-protocol kubectl asks for.
pub const PROTOCOL: &str = "v4.channel.k8s.io";
const DATA: u8 = 0;
const ERROR: u8 = 1;

/// What one forwarded connection carried back.
#[derive(Debug, Default)]
pub struct Forwarded {
    /// The bytes the pod's server sent.
    pub data: Vec<u8>,
    /// What the streaming server reported on the error channel (empty when
    /// the forward went well).
    pub error: String,
}

impl Forwarded {
    /// The body of an HTTP response in `data`, if it is one.
    pub fn http_body(&self) -> Option<&[u8]> {
        let at = self.data.windows(4).position(|w| w == b"\r\n\r\n")?;
        Some(&self.data[at + 4..])
    }
}

/// Opens `url` (from `PortForward`) for `port`, sends `request` on the data
/// channel and collects both channels until the server closes, at most
/// `timeout`.
pub fn forward_once(url: &str, port: u16, request: &[u8], timeout: Duration) -> Result<Forwarded> {
    forward_until(url, port, request, usize::MAX, timeout)
}

/// [`forward_once`], but done as soon as `enough` data bytes arrived (a
/// streaming server keeps the stream up to a second after the pod's side
/// ended, waiting for the client's: benchmarks stop the clock at the last
/// byte instead).
pub fn forward_until(
    url: &str,
    port: u16,
    request: &[u8],
    enough: usize,
    timeout: Duration,
) -> Result<Forwarded> {
    let mut ws = open(url, port, timeout)?;
    let mut frame = Vec::with_capacity(request.len() + 1);
    frame.push(DATA);
    frame.extend_from_slice(request);
    ws.send(Message::binary(frame))
        .context("sending on the data channel")?;
    let deadline = Instant::now() + timeout;
    let mut out = Forwarded::default();
    // Each channel opens with the port (two bytes); those are not payload.
    let mut prefix = [2usize, 2usize];
    loop {
        if Instant::now() > deadline {
            bail!("port-forward to {port} did not end within {timeout:?}");
        }
        let message = match ws.read() {
            Ok(message) => message,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => break,
            Err(e) => return Err(e).context("reading the port-forward stream"),
        };
        let bytes = match message {
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, mut payload)) = bytes.split_first() else {
            continue;
        };
        let Some(skip) = prefix.get_mut(channel as usize) else {
            bail!("message on unknown channel {channel}");
        };
        let n = (*skip).min(payload.len());
        *skip -= n;
        payload = &payload[n..];
        match channel {
            DATA => out.data.extend_from_slice(payload),
            ERROR => out.error.push_str(&String::from_utf8_lossy(payload)),
            _ => {}
        }
        if out.data.len() >= enough {
            let _ = ws.close(None);
            break;
        }
    }
    Ok(out)
}

/// The WebSocket handshake on `url` (http:// becomes ws://).
fn open(url: &str, port: u16, timeout: Duration) -> Result<WebSocket<TcpStream>> {
    let ws_url = match url.strip_prefix("http://") {
        Some(rest) => format!("ws://{rest}"),
        None => bail!("port-forward URL {url:?} is not http://"),
    };
    let sep = if ws_url.contains('?') { '&' } else { '?' };
    let ws_url = format!("{ws_url}{sep}port={port}");
    let mut request = ws_url
        .as_str()
        .into_client_request()
        .with_context(|| format!("port-forward URL {ws_url:?}"))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .context("port-forward URL without a host")?;
    let stream = TcpStream::connect(&host).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let (ws, response) = tungstenite::client(request, stream)
        .map_err(|e| anyhow::anyhow!("WebSocket handshake with {ws_url}: {e}"))?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if protocol != Some(PROTOCOL) {
        bail!("the streaming server chose sub-protocol {protocol:?}, not {PROTOCOL}");
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_body_follows_the_headers() {
        let f = Forwarded {
            data: b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nbody".to_vec(),
            error: String::new(),
        };
        assert_eq!(f.http_body(), Some(&b"body"[..]));
        assert_eq!(Forwarded::default().http_body(), None);
    }
}
