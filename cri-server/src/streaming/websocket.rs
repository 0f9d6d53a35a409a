//! The WebSocket channel protocols (`v5.channel.k8s.io` down to
//! `channel.k8s.io`): every message starts with its channel's number; the
//! `base64.` variants (`v4.base64.channel.k8s.io`, `base64.channel.k8s.io`,
//! for clients that cannot send binary messages) send text messages whose
//! first character is `'0'` plus the channel and whose rest is the data in
//! base64 ([`Framing`]). Exec and attach use stdin 0, stdout 1, stderr 2, error 3 and
//! resize 4; `v5` adds the message `[255, channel]` that closes a channel
//! (the client's end of stdin). Port-forward gives each port a data channel
//! `2i` and an error channel `2i + 1`, each opened by a message holding
//! the port (16 bits, little endian), as kubelet's streaming server does.

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::portforward::{self, Dialer};
use super::{status, Session};
use crate::runtime::exec::{ExecIo, TermSize};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// `v5.channel.k8s.io`: `[CLOSE, channel]` closes a channel.
pub const CLOSE: u8 = 255;

/// The remote-command sub-protocols served, preferred first.
pub const EXEC_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// The port-forward sub-protocols served (the channel layout above).
pub const PORT_FORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// How a sub-protocol puts a channel's data in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A binary message: the channel's number, then the data.
    Binary,
    /// A text message: `'0' + channel`, then the data in base64 (as
    /// kubelet's, the channel wraps around a byte).
    Base64,
}

impl Framing {
    pub fn of(protocol: &str) -> Self {
        if protocol.contains("base64.") {
            Framing::Base64
        } else {
            Framing::Binary
        }
    }

    /// The message carrying `data` on `channel`.
    pub fn message(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Framing::Binary => {
                let mut m = Vec::with_capacity(data.len() + 1);
                m.push(channel);
                m.extend_from_slice(data);
                Message::binary(m)
            }
            Framing::Base64 => {
                let mut text = String::with_capacity(data.len() * 4 / 3 + 5);
                text.push(char::from(b'0'.wrapping_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
                Message::text(text)
            }
        }
    }

    /// The channel and data of a client's message; `None` for one that
    /// carries none (control messages, the other framing, bad base64).
    pub fn parse(self, message: Message) -> Option<(u8, Vec<u8>)> {
        match (self, message) {
            (Framing::Binary, Message::Binary(data)) => {
                let (&channel, payload) = data.split_first()?;
                Some((channel, payload.to_vec()))
            }
            (Framing::Base64, Message::Text(text)) => {
                let (&first, rest) = text.as_bytes().split_first()?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((first.wrapping_sub(b'0'), data))
            }
            _ => None,
        }
    }
}

/// Room for output in flight between a process and the socket.
const PIPE: usize = 64 * 1024;

/// The first of the client's offered sub-protocols that `served` has.
pub fn choose_protocol(offered: &str, served: &[&'static str]) -> Option<&'static str> {
    offered
        .split(',')
        .map(str::trim)
        .find_map(|p| served.iter().find(|s| **s == p).copied())
}

type Ws<T> = WebSocketStream<T>;

/// Serves an exec or attach over `ws` with sub-protocol `protocol`.
pub async fn serve_remote_command<T>(ws: Ws<T>, protocol: &str, session: Session)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Session { target, runtime } = session;
    let opts = target.stdio();
    let v5 = protocol.starts_with("v5.");
    let structured = protocol.starts_with("v4.") || v5;
    let framing = Framing::of(protocol);
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // A first (empty) message on the lowest channel the client reads tells
    // it the stream is up.
    let first = if opts.stdout {
        STDOUT
    } else if opts.stderr && !opts.tty {
        STDERR
    } else {
        ERROR
    };
    let _ = out_tx.send(framing.message(first, &[])).await;

    let mut stdin_writer: Option<DuplexStream> = None;
    let mut io = ExecIo {
        stdin: None,
        stdout: None,
        stderr: None,
        resize: None,
        gone: Box::pin(std::future::pending()),
    };
    if opts.stdin {
        let (w, r) = tokio::io::duplex(PIPE);
        stdin_writer = Some(w);
        io.stdin = Some(Box::pin(r));
    }
    let mut copies = Vec::new();
    for (wanted, channel) in [(opts.stdout, STDOUT), (opts.stderr && !opts.tty, STDERR)] {
        if wanted {
            let (w, r) = tokio::io::duplex(PIPE);
            copies.push(tokio::spawn(send_channel(
                r,
                channel,
                framing,
                out_tx.clone(),
            )));
            if channel == STDOUT {
                io.stdout = Some(Box::pin(w));
            } else {
                io.stderr = Some(Box::pin(w));
            }
        }
    }
    let mut resize_tx = None;
    if opts.tty {
        let (tx, rx) = mpsc::channel(8);
        resize_tx = Some(tx);
        io.resize = Some(rx);
    }
    let (gone_tx, gone_rx) = oneshot::channel::<()>();
    io.gone = Box::pin(async move {
        let _ = gone_rx.await;
    });
    let reader = tokio::spawn(async move {
        let mut stdin_writer = stdin_writer;
        while let Some(Ok(message)) = source.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
            let Some((channel, payload)) = framing.parse(message) else {
                continue;
            };
            match channel {
                STDIN => {
                    if let Some(w) = stdin_writer.as_mut() {
                        if w.write_all(&payload).await.is_err() {
                            stdin_writer = None;
                        }
                    }
                }
                RESIZE => {
                    if let (Some(tx), Some(size)) = (&resize_tx, parse_resize(&payload)) {
                        let _ = tx.try_send(size);
                    }
                }
                CLOSE if v5 && payload.first() == Some(&STDIN) => {
                    if let Some(mut w) = stdin_writer.take() {
                        let _ = w.shutdown().await;
                    }
                }
                _ => {}
            }
        }
        let _ = gone_tx.send(());
    });
    let outcome = target.run(&runtime, io).await;
    for c in copies {
        let _ = c.await;
    }
    let bytes = status::error_channel_bytes(&outcome, structured);
    if !bytes.is_empty() {
        let _ = out_tx.send(framing.message(ERROR, &bytes)).await;
    }
    let _ = out_tx
        .send(Message::Close(Some(CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    drop(out_tx);
    let _ = writer.await;
    reader.abort();
}

/// Copies one output of the process to channel `channel`, ending when the
/// process side closes.
async fn send_channel(
    mut from: DuplexStream,
    channel: u8,
    framing: Framing,
    to: mpsc::Sender<Message>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf[..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.send(framing.message(channel, &buf[..n])).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// A resize message: `{"Width": w, "Height": h}`.
pub fn parse_resize(payload: &[u8]) -> Option<TermSize> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    let s: Size = serde_json::from_slice(payload).ok()?;
    Some(TermSize {
        width: s.width,
        height: s.height,
    })
}

/// Serves a port-forward over `ws` with sub-protocol `protocol`: one TCP
/// connection per port of `ports`, dialled inside the pod when the stream
/// opens.
pub async fn serve_port_forward<T>(ws: Ws<T>, protocol: &str, ports: Vec<u16>, dial: Dialer)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = Framing::of(protocol);
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut inputs: Vec<Option<DuplexStream>> = Vec::new();
    let mut forwards = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        for channel in [data, error] {
            let _ = out_tx
                .send(framing.message(channel, &port.to_le_bytes()))
                .await;
        }
        let (w, r) = tokio::io::duplex(PIPE);
        inputs.push(Some(w));
        let (out_tx, dial, port) = (out_tx.clone(), dial.clone(), *port);
        forwards.push(tokio::spawn(async move {
            match dial(port).await {
                Ok(conn) => forward_channel(conn, r, data, framing, out_tx).await,
                Err(why) => {
                    let _ = out_tx.send(framing.message(error, why.as_bytes())).await;
                }
            }
        }));
    }
    drop(out_tx);
    let mut all_done = Box::pin(futures_util::future::join_all(forwards));
    loop {
        let message = tokio::select! {
            m = source.next() => m,
            // Every connection ended: so does the stream.
            _ = &mut all_done => break,
        };
        let Some(Ok(message)) = message else {
            break;
        };
        if matches!(message, Message::Close(_)) {
            break;
        }
        let Some((channel, payload)) = framing.parse(message) else {
            continue;
        };
        if channel % 2 != 0 {
            continue;
        }
        let index = usize::from(channel / 2);
        if let Some(Some(w)) = inputs.get_mut(index) {
            if w.write_all(&payload).await.is_err() {
                inputs[index] = None;
            }
        }
    }
    // Whatever is still open ends with the stream.
    drop(inputs);
    drop(all_done);
    let _ = writer.await;
}

/// Copies between a TCP connection and one data channel; a connection
/// the pod refused is reported on the error channel.
async fn forward_channel(
    conn: tokio::net::TcpStream,
    mut from_client: DuplexStream,
    channel: u8,
    framing: Framing,
    to: mpsc::Sender<Message>,
) {
    let (mut rd, mut wr) = conn.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut from_client, &mut wr).await;
        let _ = wr.shutdown().await;
    };
    let data = to.clone();
    let down = async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut carried = 0u64;
        loop {
            match rd.read(&mut buf[..]).await {
                Ok(0) => break,
                Err(e) => {
                    if let Some(why) = portforward::refused(&e, carried) {
                        let _ = to.send(framing.message(channel + 1, why.as_bytes())).await;
                    }
                    break;
                }
                Ok(n) => {
                    carried += n as u64;
                    if data
                        .send(framing.message(channel, &buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    // The pod's side ended: the client has a moment to finish its own.
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        _ = &mut up => { (&mut down).await; }
        _ = &mut down => { let _ = tokio::time::timeout(LINGER, &mut up).await; }
    }
}

/// How long a forwarded connection whose pod side ended waits for the
/// client's side to end too.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// A byte stream carried in the binary messages of `ws` (SPDY tunnelled
/// in WebSocket): what is written to the returned end goes out as
/// messages, what comes in is read from it.
pub fn tunnel<T>(ws: Ws<T>) -> DuplexStream
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (mut rd, mut wr) = tokio::io::split(ours);
    let (mut sink, mut source) = ws.split();
    tokio::spawn(async move {
        let incoming = async {
            while let Some(Ok(message)) = source.next().await {
                match message {
                    Message::Binary(data) if wr.write_all(&data).await.is_err() => break,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = wr.shutdown().await;
        };
        let outgoing = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf[..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        tokio::join!(incoming, outgoing);
    });
    theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_choice_follows_the_client_order() {
        assert_eq!(
            choose_protocol("v5.channel.k8s.io, v4.channel.k8s.io", EXEC_PROTOCOLS),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            choose_protocol("base64.channel.k8s.io,v4.channel.k8s.io", EXEC_PROTOCOLS),
            Some("base64.channel.k8s.io")
        );
        assert_eq!(
            choose_protocol("v4.base64.channel.k8s.io", PORT_FORWARD_PROTOCOLS),
            Some("v4.base64.channel.k8s.io")
        );
        assert_eq!(choose_protocol("v9.channel.k8s.io", EXEC_PROTOCOLS), None);
        assert_eq!(choose_protocol("", EXEC_PROTOCOLS), None);
    }

    #[test]
    fn framings_carry_a_channel_and_its_data() {
        assert_eq!(Framing::of("v5.channel.k8s.io"), Framing::Binary);
        assert_eq!(Framing::of("v4.base64.channel.k8s.io"), Framing::Base64);
        assert_eq!(Framing::of("base64.channel.k8s.io"), Framing::Base64);
        // kubelet's base64 form: the channel as a digit, then base64.
        let m = Framing::Base64.message(STDOUT, b"hi\n");
        assert_eq!(m, Message::text("1aGkK"));
        assert_eq!(
            Framing::Base64.parse(Message::text("0aGkK")),
            Some((STDIN, b"hi\n".to_vec()))
        );
        assert_eq!(Framing::Base64.message(ERROR, &[]), Message::text("3"));
        assert_eq!(Framing::Base64.parse(Message::text("0!!")), None);
        assert_eq!(Framing::Base64.parse(Message::text("")), None);
        assert_eq!(Framing::Base64.parse(Message::binary(vec![0, 1])), None);
        // Binary: the channel's byte, then the data.
        let m = Framing::Binary.message(STDERR, b"x");
        assert_eq!(m, Message::binary(vec![STDERR, b'x']));
        assert_eq!(Framing::Binary.parse(m), Some((STDERR, b"x".to_vec())));
        assert_eq!(Framing::Binary.parse(Message::binary(vec![])), None);
        assert_eq!(Framing::Binary.parse(Message::text("0aGkK")), None);
        // Past '9' the channel character goes on as kubelet's does.
        let far = Framing::Base64.message(11, b"");
        assert_eq!(Framing::Base64.parse(far), Some((11, Vec::new())));
    }

    #[test]
    fn resize_messages() {
        assert_eq!(
            parse_resize(br#"{"Width":120,"Height":40}"#),
            Some(TermSize {
                width: 120,
                height: 40
            })
        );
        assert_eq!(parse_resize(b"{"), None);
        assert_eq!(parse_resize(br#"{"Width":-1,"Height":40}"#), None);
    }
}
