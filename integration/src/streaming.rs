//! Clients of a CRI streaming server (the URLs of Exec, Attach and
//! PortForward), speaking what kubectl, kubelet and crictl speak: an
//! HTTP/1.1 upgrade to SPDY/3.1 with the remote-command or port-forward
//! sub-protocol (`X-Stream-Protocol-Version`), one SPDY stream per standard
//! stream (`streamtype` header) or per forwarded connection (`requestid`,
//! `port`); or a WebSocket with the channel protocols, each message
//! prefixed by its channel.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use cri_server::streaming::spdy::{Role, SpdySession};
use cri_server::streaming::websocket::Framing;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub use crate::portforward::Forwarded;

/// What a client does in an exec or attach.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub tty: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Sent on stdin (a stdin stream is opened when this is set).
    pub stdin: Option<Vec<u8>>,
    /// Ends stdin after sending it.
    pub close_stdin: bool,
    /// A terminal size (columns, rows) sent before stdin.
    pub resize: Option<(u16, u16)>,
    /// Ends the session once stdout holds this (attach, which never ends
    /// on its own).
    pub until_stdout_has: Option<String>,
}

/// What came back.
#[derive(Debug, Default)]
pub struct Run {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel's bytes (a `Status` object under v4 and v5).
    pub error: Vec<u8>,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The exit code the status carries, as kubectl reads it: 0 for
    /// `Success`, the `ExitCode` cause of a `NonZeroExitCode` failure.
    pub fn exit_code(&self) -> Result<i32> {
        let status: serde_json::Value = serde_json::from_slice(&self.error)
            .with_context(|| format!("status {:?}", String::from_utf8_lossy(&self.error)))?;
        match status["status"].as_str() {
            Some("Success") => Ok(0),
            Some("Failure") if status["reason"] == "NonZeroExitCode" => status["details"]["causes"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse().ok())
                .context("a NonZeroExitCode status without its code"),
            _ => bail!("failure: {status}"),
        }
    }
}

fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host.to_string(), format!("/{path}")))
}

/// Upgrades `url` to SPDY/3.1 offering `protocols`; returns the chosen one
/// and the session.
pub async fn spdy_connect(url: &str, protocols: &[&str]) -> Result<(String, SpdySession)> {
    let (host, path) = split_url(url)?;
    let mut tcp = TcpStream::connect(&host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    // The head only, byte by byte: what follows is SPDY.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            bail!(
                "upgrade answer cut short: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.contains(" 101 ") {
        let mut body = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut body))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        bail!(
            "no upgrade: {status_line}: {}",
            String::from_utf8_lossy(&body[..n]).trim()
        );
    }
    let chosen = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("X-Stream-Protocol-Version")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let (session, _incoming) = SpdySession::start(tcp, Role::Client);
    Ok((chosen, session))
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn read_all(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = r.read_to_end(&mut out).await;
    out
}

/// Reads `r` until it ends or its bytes contain `needle`.
async fn read_until(mut r: impl AsyncRead + Unpin, needle: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if let Some(n) = needle {
            if String::from_utf8_lossy(&out).contains(n) {
                return out;
            }
        }
    }
}

/// An exec or attach over SPDY with `protocol`.
pub async fn spdy_remote_command(url: &str, protocol: &str, script: &Script) -> Result<Run> {
    let (chosen, session) = spdy_connect(url, &[protocol]).await?;
    if chosen != protocol {
        bail!("the server chose {chosen:?}, not {protocol:?}");
    }
    // kubectl's order: error, stdin, stdout, stderr, resize.
    let error = session
        .open_stream(headers(&[("streamtype", "error")]))
        .await?;
    let stdin = match &script.stdin {
        Some(_) => Some(
            session
                .open_stream(headers(&[("streamtype", "stdin")]))
                .await?,
        ),
        None => None,
    };
    let stdout = match script.stdout {
        true => Some(
            session
                .open_stream(headers(&[("streamtype", "stdout")]))
                .await?,
        ),
        false => None,
    };
    let stderr = match script.stderr && !script.tty {
        true => Some(
            session
                .open_stream(headers(&[("streamtype", "stderr")]))
                .await?,
        ),
        false => None,
    };
    let mut resize = match script.tty {
        true => Some(
            session
                .open_stream(headers(&[("streamtype", "resize")]))
                .await?,
        ),
        false => None,
    };
    if let (Some(r), Some((w, h))) = (resize.as_mut(), script.resize) {
        r.write_all(format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes())
            .await?;
    }
    if let (Some(mut s), Some(data)) = (stdin, script.stdin.clone()) {
        let close = script.close_stdin;
        tokio::spawn(async move {
            let _ = s.write_all(&data).await;
            if close {
                let _ = s.shutdown().await;
            } else {
                // Held open until the session ends.
                std::future::pending::<()>().await;
            }
        });
    }
    let needle = script.until_stdout_has.clone();
    let out = async {
        match stdout {
            Some(s) => read_until(s, needle.as_deref()).await,
            None => Vec::new(),
        }
    };
    let err = async {
        match stderr {
            Some(s) => read_all(s).await,
            None => Vec::new(),
        }
    };
    let (stdout, stderr) = if needle.is_some() {
        // An attach's stderr stays open while the container runs: what it
        // gave by the time stdout has the needle is all that is awaited.
        tokio::pin!(out, err);
        tokio::select! {
            stdout = &mut out => (stdout, Vec::new()),
            stderr = &mut err => (out.await, stderr),
        }
    } else {
        tokio::join!(out, err)
    };
    let error = if needle.is_some() {
        // An attach ends when the client leaves.
        session.close().await;
        Vec::new()
    } else {
        read_all(error).await
    };
    session.close().await;
    Ok(Run {
        stdout,
        stderr,
        error,
    })
}

/// Port-forward over SPDY: one session, one pair of streams per
/// connection, all at once; each sends its request and reads to the end.
pub async fn spdy_port_forward(
    url: &str,
    connections: &[(u16, Vec<u8>)],
) -> Result<Vec<Forwarded>> {
    let (chosen, session) = spdy_connect(url, &["portforward.k8s.io"]).await?;
    if chosen != "portforward.k8s.io" {
        bail!("the server chose {chosen:?}");
    }
    let mut tasks = Vec::new();
    for (i, (port, request)) in connections.iter().enumerate() {
        let (port, id) = (port.to_string(), i.to_string());
        let error = session
            .open_stream(headers(&[
                ("streamtype", "error"),
                ("port", &port),
                ("requestid", &id),
            ]))
            .await?;
        let mut data = session
            .open_stream(headers(&[
                ("streamtype", "data"),
                ("port", &port),
                ("requestid", &id),
            ]))
            .await?;
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let _ = data.write_all(&request).await;
            let (data, error) = tokio::join!(read_all(data), read_all(error));
            Forwarded {
                data,
                error: String::from_utf8_lossy(&error).into_owned(),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await?);
    }
    session.close().await;
    Ok(out)
}

/// An exec or attach over a WebSocket with `protocol`.
pub async fn ws_remote_command(url: &str, protocol: &str, script: &Script) -> Result<Run> {
    const STDIN: u8 = 0;
    const STDOUT: u8 = 1;
    const STDERR: u8 = 2;
    const ERROR: u8 = 3;
    const RESIZE: u8 = 4;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut request = ws_url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol)?);
    let (host, _) = split_url(url)?;
    let tcp = TcpStream::connect(&host).await?;
    let (ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .context("WebSocket handshake")?;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if chosen != protocol {
        bail!("the server chose {chosen:?}, not {protocol:?}");
    }
    let (mut sink, mut source) = ws.split();
    // Binary, or text in the base64 variants (pinned to kubelet's form by
    // the framing's unit tests).
    let framing = Framing::of(protocol);
    let message = |channel: u8, data: &[u8]| framing.message(channel, data);
    if let Some((w, h)) = script.resize {
        sink.send(message(
            RESIZE,
            format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes(),
        ))
        .await?;
    }
    if let Some(data) = &script.stdin {
        sink.send(message(STDIN, data)).await?;
        if script.close_stdin {
            sink.send(Message::binary(vec![255, STDIN])).await?;
        }
    }
    let mut run = Run::default();
    while let Some(m) = source.next().await {
        let m = match m {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(m) => m,
        };
        let Some((channel, payload)) = framing.parse(m) else {
            continue;
        };
        match channel {
            STDOUT => run.stdout.extend_from_slice(&payload),
            STDERR => run.stderr.extend_from_slice(&payload),
            ERROR => run.error.extend_from_slice(&payload),
            _ => {}
        }
        if let Some(n) = &script.until_stdout_has {
            if run.stdout_text().contains(n.as_str()) {
                break;
            }
        }
    }
    let _ = sink.close().await;
    Ok(run)
}
