//! Exec and attach over SPDY, the remote-command protocols kubelet serves
//! (`v4.channel.k8s.io` down to `channel.k8s.io`): the client opens one
//! stream per standard stream, named by its `streamtype` header (`error`,
//! `stdin`, `stdout`, `stderr`, and `resize` with a terminal from v3 on);
//! once all it asked for are open the process runs. Resize messages are
//! JSON objects one after another; at the end the error stream carries the
//! outcome ([`super::status`]) and the session is closed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::spdy::{Role, SpdySession, SpdyStream};
use super::{status, websocket, Session};
use crate::runtime::exec::{ExecIo, ExecOptions, ExecOutcome, TermSize};

/// The sub-protocols served, preferred first.
pub const PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long the client has to open its streams (kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest resize message kept while waiting for its end.
const MAX_RESIZE_MESSAGE: usize = 4096;

#[derive(Default)]
struct Streams {
    error: Option<SpdyStream>,
    stdin: Option<SpdyStream>,
    stdout: Option<SpdyStream>,
    stderr: Option<SpdyStream>,
    resize: Option<SpdyStream>,
}

impl Streams {
    fn complete(&self, want: &ExecOptions, resize: bool) -> bool {
        self.error.is_some()
            && (!want.stdin || self.stdin.is_some())
            && (!want.stdout || self.stdout.is_some())
            && (!want.stderr || want.tty || self.stderr.is_some())
            && (!resize || self.resize.is_some())
    }
}

/// Serves one exec or attach on `io` (an upgraded connection).
pub async fn serve<T>(io: T, protocol: &str, session: Session)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (spdy, mut incoming) = SpdySession::start(io, Role::Server);
    let want = session.target.stdio().clone();
    let structured = protocol.starts_with("v4.");
    let resize_wanted = want.tty && !matches!(protocol, "v2.channel.k8s.io" | "channel.k8s.io");
    let mut streams = Streams::default();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while !streams.complete(&want, resize_wanted) {
        let stream = tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => s,
                None => return,
            },
            _ = &mut deadline => {
                tracing::debug!("remote command: the client did not open its streams in time");
                if let Some(mut e) = streams.error.take() {
                    let why = ExecOutcome::Failed("timed out waiting for the client's streams".into());
                    let _ = e.write_all(&status::error_channel_bytes(&why, structured)).await;
                    let _ = e.shutdown().await;
                }
                spdy.close().await;
                return;
            }
        };
        let slot = match stream.header("streamtype") {
            Some("error") => &mut streams.error,
            Some("stdin") => &mut streams.stdin,
            Some("stdout") => &mut streams.stdout,
            Some("stderr") => &mut streams.stderr,
            Some("resize") => &mut streams.resize,
            _ => {
                stream.reset();
                continue;
            }
        };
        if slot.is_some() {
            stream.reset();
            continue;
        }
        *slot = Some(stream);
    }
    // Streams past the ones awaited (a late extra one) are refused.
    let refuse = tokio::spawn(async move {
        while let Some(s) = incoming.recv().await {
            s.reset();
        }
    });
    let closed = spdy.clone();
    let mut io = ExecIo {
        stdin: streams.stdin.take().map(|s| Box::pin(s) as _),
        stdout: streams.stdout.take().map(|s| Box::pin(s) as _),
        stderr: streams.stderr.take().map(|s| Box::pin(s) as _),
        resize: None,
        gone: Box::pin(async move { closed.closed().await }),
    };
    let mut resize_task = None;
    if let Some(stream) = streams.resize.take() {
        let (tx, rx) = mpsc::channel(8);
        io.resize = Some(rx);
        resize_task = Some(tokio::spawn(read_resizes(stream, tx)));
    }
    let outcome = session.target.run(&session.runtime, io).await;
    if let Some(mut e) = streams.error.take() {
        let bytes = status::error_channel_bytes(&outcome, structured);
        if !bytes.is_empty() {
            let _ = e.write_all(&bytes).await;
        }
        let _ = e.shutdown().await;
    }
    if let Some(t) = resize_task {
        t.abort();
    }
    refuse.abort();
    spdy.close().await;
}

/// Reads the resize stream: JSON objects back to back.
async fn read_resizes(mut stream: SpdyStream, tx: mpsc::Sender<TermSize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut used = 0;
        for end in split_json_objects(&buf) {
            if let Some(size) = websocket::parse_resize(&buf[used..end]) {
                let _ = tx.try_send(size);
            }
            used = end;
        }
        buf.drain(..used);
        if buf.len() > MAX_RESIZE_MESSAGE {
            return;
        }
    }
}

/// The end offsets of the complete top-level JSON objects at the start of
/// `buf` (resize messages hold no strings with braces).
fn split_json_objects(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut depth = 0usize;
    for (i, b) in buf.iter().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    ends.push(i + 1);
                }
            }
            _ => {}
        }
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_messages_back_to_back() {
        let buf = br#"{"Width":80,"Height":24}{"Width":100,"Height":30}{"Wid"#;
        let ends = split_json_objects(buf);
        assert_eq!(ends.len(), 2);
        assert_eq!(
            websocket::parse_resize(&buf[ends[0]..ends[1]]),
            Some(TermSize {
                width: 100,
                height: 30
            })
        );
    }
}
