//! The session: reader and writer tasks, streams, flow control.
//!
//! All shared state sits behind one `std::sync::Mutex` (never held across an
//! await); stream handles poll it with wakers. Frames leave through one FIFO
//! outbox drained by the writer task, which alone owns the header deflater,
//! so wire order and header-compression order agree.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::frame::{
    goaway, rst, setting, Frame, FrameDecoder, FrameEncoder, Setting, FLAG_FIN, FLAG_UNIDIRECTIONAL,
};
use super::header_block::encode_block;
use super::{header, Headers, SpdyError};

/// SPDY/3.1's initial stream and session window.
const DEFAULT_WINDOW: i64 = 64 * 1024;
/// Largest a window may grow (31 bits).
const MAX_WINDOW: i64 = 0x7fff_ffff;
/// The per-stream receive window we announce in SETTINGS.
pub const STREAM_RECV_WINDOW: i64 = 256 * 1024;
/// The session receive window we grow to with our first WINDOW_UPDATE.
pub const SESSION_RECV_WINDOW: i64 = 1024 * 1024;
/// Received-but-unread bytes (all streams) past which the reader stops
/// reading the connection. Equal to the session window, so a peer that
/// honours our windows never meets it.
pub const RECV_BUFFER: usize = SESSION_RECV_WINDOW as usize;
/// Largest DATA frame we send.
pub const MAX_DATA_FRAME: usize = 16 * 1024;
/// Most streams open at once; the peer's further SYN_STREAMs are refused.
pub const MAX_STREAMS: usize = 1024;
/// Queued DATA bytes past which stream writes wait for the writer task.
const MAX_QUEUED_DATA: usize = 256 * 1024;
/// Queued control frames past which the peer is deemed not to be reading
/// (it keeps provoking PING echoes and the like): the session ends.
const MAX_QUEUED_CONTROL: usize = 4096;
/// How long `close` waits for queued frames to drain before cutting the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes the writer task gathers into one write.
const WRITE_BATCH: usize = 64 * 1024;
/// Bytes the reader task asks for per read.
const READ_CHUNK: usize = 32 * 1024;

/// Which end of the connection we are: the server accepts the streams the
/// client opens (kubelet's streaming server is the server side). It fixes
/// the parity of stream and ping ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    /// The parity (1 odd, 0 even) of the ids this side originates.
    fn parity(self) -> u32 {
        match self {
            Role::Client => 1,
            Role::Server => 0,
        }
    }
}

/// A SPDY session over one upgraded connection. Cheap to clone.
#[derive(Clone)]
pub struct SpdySession {
    inner: Arc<Inner>,
}

struct Inner {
    role: Role,
    state: Mutex<State>,
    /// Wakes the writer task when the outbox gains frames or the session ends.
    writer_wake: Notify,
    /// Set to make both tasks quit at once.
    stop: watch::Sender<bool>,
    /// Set once both tasks have finished: the connection is gone.
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Frame>,
    data_bytes: usize,
    control: usize,
}

impl Outbox {
    fn push(&mut self, frame: Frame) {
        match &frame {
            Frame::Data { data, .. } => self.data_bytes += data.len(),
            _ => self.control += 1,
        }
        self.frames.push_back(frame);
    }

    fn pop(&mut self) -> Option<Frame> {
        let frame = self.frames.pop_front()?;
        match &frame {
            Frame::Data { data, .. } => self.data_bytes -= data.len(),
            _ => self.control -= 1,
        }
        Some(frame)
    }
}

struct State {
    streams: HashMap<u32, StreamState>,
    next_stream_id: u32,
    last_peer_stream_id: u32,
    out: Outbox,
    /// The peer has shown it does flow control (sent SETTINGS or
    /// WINDOW_UPDATE): from then on its windows bind our writes and its
    /// overruns of ours are errors. spdystream never does.
    peer_flow_control: bool,
    peer_initial_window: i64,
    send_window: i64,
    recv_window: i64,
    recv_unacked: i64,
    recv_buffered: usize,
    /// The reader task, waiting for `recv_buffered` to drop.
    space_waker: Option<Waker>,
    incoming: Option<mpsc::Sender<SpdyStream>>,
    /// No more frames will be read or queued by streams: GOAWAY either way,
    /// `close`, the peer hanging up, or an error.
    ending: bool,
    tasks_running: u8,
}

struct StreamState {
    recv_buf: BytesMut,
    recv_fin: bool,
    recv_window: i64,
    recv_unacked: i64,
    reader_gone: bool,
    read_waker: Option<Waker>,
    send_window: i64,
    sent_fin: bool,
    write_waker: Option<Waker>,
    /// RST_STREAM status, sent or received.
    reset: Option<u32>,
    /// `open_stream` waiting for the SYN_REPLY.
    reply: Option<oneshot::Sender<Result<(), SpdyError>>>,
}

impl StreamState {
    fn new(send_window: i64) -> Self {
        Self {
            recv_buf: BytesMut::new(),
            recv_fin: false,
            recv_window: STREAM_RECV_WINDOW,
            recv_unacked: 0,
            reader_gone: false,
            read_waker: None,
            send_window,
            sent_fin: false,
            write_waker: None,
            reset: None,
            reply: None,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

impl State {
    /// Drops a stream once nothing more can pass in either direction.
    fn reap(&mut self, id: u32) {
        if let Some(s) = self.streams.get(&id) {
            let send_done = s.sent_fin || s.reset.is_some();
            let recv_done =
                (s.recv_fin || s.reset.is_some() || s.reader_gone) && s.recv_buf.is_empty();
            if send_done && recv_done && s.reply.is_none() {
                self.streams.remove(&id);
            }
        }
    }

    /// Records `n` received bytes as consumed (read, or discarded) and grants
    /// them back to the peer once half a window has built up.
    fn credit(&mut self, id: u32, n: usize) {
        let n = n as i64;
        self.recv_unacked += n;
        if self.recv_unacked >= SESSION_RECV_WINDOW / 2 {
            self.out.push(Frame::WindowUpdate {
                stream_id: 0,
                delta: self.recv_unacked as u32,
            });
            self.recv_window += self.recv_unacked;
            self.recv_unacked = 0;
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_unacked += n;
            if s.recv_unacked >= STREAM_RECV_WINDOW / 2 && !s.recv_fin && s.reset.is_none() {
                self.out.push(Frame::WindowUpdate {
                    stream_id: id,
                    delta: s.recv_unacked as u32,
                });
                s.recv_window += s.recv_unacked;
                s.recv_unacked = 0;
            }
        }
    }

    /// Forgets a stream's unread bytes (reset, or nobody left to read them).
    fn discard(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = s.recv_buf.len();
        s.recv_buf = BytesMut::new();
        self.recv_buffered -= n;
        self.credit(id, n);
        self.wake_space();
    }

    fn wake_space(&mut self) {
        if self.recv_buffered <= RECV_BUFFER {
            if let Some(w) = self.space_waker.take() {
                w.wake();
            }
        }
    }

    fn reset_stream(&mut self, id: u32, status: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(status);
        if let Some(tx) = s.reply.take() {
            let _ = tx.send(Err(SpdyError::StreamReset(status)));
        }
        s.wake();
        self.out.push(Frame::RstStream {
            stream_id: id,
            status,
        });
        self.discard(id);
        self.reap(id);
    }

    /// Enters the ending state: nothing new is read or sent by streams; reads
    /// drain what is buffered, then see EOF.
    fn begin_end(&mut self) {
        if self.ending {
            return;
        }
        self.ending = true;
        self.incoming = None;
        for s in self.streams.values_mut() {
            s.reply = None;
            s.wake();
        }
        if let Some(w) = self.space_waker.take() {
            w.wake();
        }
    }

    fn wake_writers(&mut self) {
        for s in self.streams.values_mut() {
            if let Some(w) = s.write_waker.take() {
                w.wake();
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock must not wedge every
        // stream: the state stays consistent between statements.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn task_done(&self) {
        let last = {
            let mut st = self.lock();
            st.tasks_running = st.tasks_running.saturating_sub(1);
            st.tasks_running == 0
        };
        if last {
            self.closed.send_replace(true);
        }
    }
}

impl SpdySession {
    /// Starts the session's reader and writer tasks on `io` (the upgraded
    /// HTTP connection). Returns the handle and the streams the peer opens,
    /// in order; each has already been answered with a SYN_REPLY.
    pub fn start<T>(io: T, role: Role) -> (SpdySession, mpsc::Receiver<SpdyStream>)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (incoming_tx, incoming_rx) = mpsc::channel(MAX_STREAMS);
        let mut out = Outbox::default();
        // Announce our windows. spdystream parses and ignores both frames.
        out.push(Frame::Settings {
            flags: 0,
            entries: vec![
                Setting {
                    flags: 0,
                    id: setting::MAX_CONCURRENT_STREAMS,
                    value: MAX_STREAMS as u32,
                },
                Setting {
                    flags: 0,
                    id: setting::INITIAL_WINDOW_SIZE,
                    value: STREAM_RECV_WINDOW as u32,
                },
            ],
        });
        out.push(Frame::WindowUpdate {
            stream_id: 0,
            delta: (SESSION_RECV_WINDOW - DEFAULT_WINDOW) as u32,
        });
        let state = State {
            streams: HashMap::new(),
            next_stream_id: if role == Role::Client { 1 } else { 2 },
            last_peer_stream_id: 0,
            out,
            peer_flow_control: false,
            peer_initial_window: DEFAULT_WINDOW,
            send_window: DEFAULT_WINDOW,
            recv_window: SESSION_RECV_WINDOW,
            recv_unacked: 0,
            recv_buffered: 0,
            space_waker: None,
            incoming: Some(incoming_tx),
            ending: false,
            tasks_running: 2,
        };
        let inner = Arc::new(Inner {
            role,
            state: Mutex::new(state),
            writer_wake: Notify::new(),
            stop: watch::Sender::new(false),
            closed: watch::Sender::new(false),
        });
        let (rd, wr) = tokio::io::split(io);
        tokio::spawn(reader_task(inner.clone(), rd));
        tokio::spawn(writer_task(inner.clone(), wr));
        inner.writer_wake.notify_one();
        (SpdySession { inner }, incoming_rx)
    }

    /// Opens a stream with these headers and waits for the peer's SYN_REPLY
    /// (spdystream drops DATA that arrives on a stream it has not replied
    /// to, so writing earlier would lose it). Dropping the future resets
    /// the stream.
    pub async fn open_stream(&self, headers: Headers) -> Result<SpdyStream, SpdyError> {
        // Refuse headers the writer could not encode before they reach it.
        encode_block(&headers)?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut guard = self.inner.lock();
            let st = &mut *guard;
            if st.ending {
                return Err(SpdyError::SessionClosed);
            }
            if st.streams.len() >= MAX_STREAMS {
                return Err(SpdyError::Protocol("too many open streams"));
            }
            let id = st.next_stream_id;
            if id > 0x7fff_ffff {
                return Err(SpdyError::StreamIdsExhausted);
            }
            st.next_stream_id = id + 2;
            let mut s = StreamState::new(st.peer_initial_window);
            s.reply = Some(tx);
            st.streams.insert(id, s);
            st.out.push(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            });
            id
        };
        self.inner.writer_wake.notify_one();
        let mut guard = OpenGuard {
            inner: &self.inner,
            id,
            armed: true,
        };
        let result = rx.await;
        guard.armed = false;
        match result {
            Ok(Ok(())) => Ok(SpdyStream::new(self.inner.clone(), id, headers)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SpdyError::SessionClosed),
        }
    }

    /// Sends GOAWAY and closes the connection once queued frames are written
    /// (cutting it after a few seconds if the peer does not take them).
    /// Open streams read what was already buffered, then EOF.
    pub async fn close(&self) {
        {
            let mut st = self.inner.lock();
            if !st.ending {
                let last = st.last_peer_stream_id;
                st.out.push(Frame::GoAway {
                    last_good_stream_id: last,
                    status: goaway::OK,
                });
                st.begin_end();
            }
        }
        self.inner.writer_wake.notify_one();
        if tokio::time::timeout(CLOSE_TIMEOUT, self.closed())
            .await
            .is_err()
        {
            tracing::debug!("spdy: close timed out writing queued frames; cutting the connection");
            self.inner.stop.send_replace(true);
            self.closed().await;
        }
    }

    /// Resolves when the connection has ended (peer closed, GOAWAY, I/O or
    /// protocol error, or `close`) and both tasks are done with it.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        // Err only if the sender is gone, which it cannot be while we hold `inner`.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

impl std::fmt::Debug for SpdySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdySession")
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

/// Resets a stream whose `open_stream` was abandoned before the reply.
struct OpenGuard<'a> {
    inner: &'a Inner,
    id: u32,
    armed: bool,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.inner.lock();
            if let Some(s) = st.streams.get_mut(&self.id) {
                s.reply = None;
            }
            st.reset_stream(self.id, rst::CANCEL);
            drop(st);
            self.inner.writer_wake.notify_one();
        }
    }
}

/// One stream: read the peer's DATA, write ours. Usable from two tasks
/// after [`SpdyStream::into_split`] (or `tokio::io::split`).
///
/// Reads return EOF once the peer sent FIN, reset the stream, or the session
/// ended (after any data already received). Dropping the write side sends
/// FIN if `shutdown` did not; dropping the read side discards what arrives.
pub struct SpdyStream {
    id: u32,
    headers: Headers,
    reader: SpdyReadHalf,
    writer: SpdyWriteHalf,
}

/// The receiving half of a [`SpdyStream`].
pub struct SpdyReadHalf {
    inner: Arc<Inner>,
    id: u32,
}

/// The sending half of a [`SpdyStream`].
pub struct SpdyWriteHalf {
    inner: Arc<Inner>,
    id: u32,
}

impl SpdyStream {
    fn new(inner: Arc<Inner>, id: u32, headers: Headers) -> Self {
        Self {
            id,
            headers,
            reader: SpdyReadHalf {
                inner: inner.clone(),
                id,
            },
            writer: SpdyWriteHalf { inner, id },
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The SYN_STREAM's headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Abruptly ends the stream (RST_STREAM with CANCEL): both directions
    /// stop, unread data is dropped.
    pub fn reset(&self) {
        self.writer.reset();
    }

    /// Splits into halves that can move to different tasks.
    pub fn into_split(self) -> (SpdyReadHalf, SpdyWriteHalf) {
        (self.reader, self.writer)
    }
}

impl std::fmt::Debug for SpdyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdyStream")
            .field("id", &self.id)
            .field("headers", &self.headers)
            .finish()
    }
}

impl SpdyReadHalf {
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl SpdyWriteHalf {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// See [`SpdyStream::reset`].
    pub fn reset(&self) {
        let mut st = self.inner.lock();
        if st.ending {
            return;
        }
        st.reset_stream(self.id, rst::CANCEL);
        drop(st);
        self.inner.writer_wake.notify_one();
    }
}

impl AsyncRead for SpdyReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        let ending = st.ending;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Ok(()));
        };
        if !s.recv_buf.is_empty() {
            let n = s.recv_buf.len().min(buf.remaining());
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            buf.put_slice(&s.recv_buf[..n]);
            s.recv_buf.advance(n);
            if s.recv_buf.is_empty() && s.recv_buf.capacity() > 2 * READ_CHUNK {
                // Give back the memory of a past burst.
                s.recv_buf = BytesMut::new();
            }
            st.recv_buffered -= n;
            let queued = st.out.frames.len();
            st.credit(self.id, n);
            st.wake_space();
            st.reap(self.id);
            let wake_writer = st.out.frames.len() != queued;
            drop(guard);
            if wake_writer {
                self.inner.writer_wake.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if s.recv_fin || s.reset.is_some() || ending {
            st.reap(self.id);
            return Poll::Ready(Ok(()));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for SpdyWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        if st.ending {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "spdy session closed",
            )));
        }
        let enforce = st.peer_flow_control;
        let session_window = st.send_window;
        let queue_full = st.out.data_bytes >= MAX_QUEUED_DATA;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "spdy stream closed",
            )));
        };
        if let Some(status) = s.reset {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("spdy stream reset (status {status})"),
            )));
        }
        if s.sent_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "spdy stream already shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut n = buf.len().min(MAX_DATA_FRAME);
        if enforce {
            let window = s.send_window.min(session_window);
            if window <= 0 {
                s.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            n = n.min(window as usize);
        }
        if queue_full {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.send_window -= n as i64;
        st.send_window -= n as i64;
        st.out.push(Frame::Data {
            stream_id: self.id,
            flags: 0,
            data: Bytes::copy_from_slice(&buf[..n]),
        });
        drop(guard);
        self.inner.writer_wake.notify_one();
        Poll::Ready(Ok(n))
    }

    /// Writes complete when queued; there is nothing more to flush here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN (an empty DATA frame with FLAG_FIN).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if send_fin(&self.inner, self.id) {
            self.inner.writer_wake.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

/// Queues FIN for a stream that has not sent it; says whether it did.
fn send_fin(inner: &Inner, id: u32) -> bool {
    let mut st = inner.lock();
    if st.ending {
        return false;
    }
    let Some(s) = st.streams.get_mut(&id) else {
        return false;
    };
    if s.sent_fin || s.reset.is_some() {
        return false;
    }
    s.sent_fin = true;
    st.out.push(Frame::Data {
        stream_id: id,
        flags: FLAG_FIN,
        data: Bytes::new(),
    });
    st.reap(id);
    true
}

impl Drop for SpdyWriteHalf {
    fn drop(&mut self) {
        if send_fin(&self.inner, self.id) {
            self.inner.writer_wake.notify_one();
        }
    }
}

impl Drop for SpdyReadHalf {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return;
        };
        s.reader_gone = true;
        s.read_waker = None;
        let queued = st.out.frames.len();
        st.discard(self.id);
        st.reap(self.id);
        let wake_writer = st.out.frames.len() != queued;
        drop(st);
        if wake_writer {
            self.inner.writer_wake.notify_one();
        }
    }
}

impl AsyncRead for SpdyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpdyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// What the reader does after handling a frame.
enum Next {
    Continue,
    /// Too much is buffered: wait for the application to read.
    WaitForSpace,
    /// Hand a new stream to the application.
    Deliver(SpdyStream),
    /// Stop reading (GOAWAY, or a fatal error already dealt with).
    Stop,
}

async fn reader_task<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut rd: R) {
    let mut stop = inner.stop.subscribe();
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    'read: loop {
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    fatal(&inner, &e);
                    break 'read;
                }
            };
            match handle_frame(&inner, frame) {
                Next::Continue => {}
                Next::Stop => break 'read,
                Next::Deliver(stream) => deliver(&inner, stream),
                Next::WaitForSpace => {
                    tokio::select! {
                        _ = wait_for_space(&inner) => {}
                        _ = stop.wait_for(|s| *s) => break 'read,
                    }
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => {
                    tracing::debug!("spdy: peer closed the connection");
                    break 'read;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("spdy: read: {e}");
                    break 'read;
                }
            },
            _ = stop.wait_for(|s| *s) => break 'read,
        }
    }
    inner.lock().begin_end();
    inner.writer_wake.notify_one();
    drop(rd);
    inner.task_done();
}

/// Ends the session for a peer that broke the protocol: GOAWAY, then close.
fn fatal(inner: &Inner, e: &SpdyError) {
    tracing::warn!("spdy: ending session: {e}");
    let mut st = inner.lock();
    if !st.ending {
        let last = st.last_peer_stream_id;
        st.out.push(Frame::GoAway {
            last_good_stream_id: last,
            status: goaway::PROTOCOL_ERROR,
        });
        st.begin_end();
    }
    drop(st);
    inner.writer_wake.notify_one();
}

fn deliver(inner: &Arc<Inner>, stream: SpdyStream) {
    let tx = inner.lock().incoming.clone();
    let refused = match tx {
        Some(tx) => tx.try_send(stream).err().map(|e| match e {
            mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
        }),
        None => Some(stream),
    };
    if let Some(stream) = refused {
        // Nobody is accepting streams: refuse it (outside the lock: dropping
        // a stream takes it).
        let id = stream.id;
        inner.lock().reset_stream(id, rst::REFUSED_STREAM);
        drop(stream);
        inner.writer_wake.notify_one();
    }
}

async fn wait_for_space(inner: &Inner) {
    poll_fn(|cx| {
        let mut st = inner.lock();
        if st.recv_buffered <= RECV_BUFFER || st.ending {
            Poll::Ready(())
        } else {
            st.space_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// Applies one frame from the peer to the session state.
fn handle_frame(inner: &Arc<Inner>, frame: Frame) -> Next {
    let mut guard = inner.lock();
    let st = &mut *guard;
    if st.ending {
        return Next::Stop;
    }
    let queued = st.out.frames.len();
    let next = match frame {
        Frame::Data {
            stream_id,
            flags,
            data,
        } => on_data(st, stream_id, flags, &data),
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => on_syn_stream(inner, st, stream_id, flags, headers),
        Frame::SynReply {
            stream_id, flags, ..
        } => {
            if let Some(s) = st.streams.get_mut(&stream_id) {
                if let Some(tx) = s.reply.take() {
                    let _ = tx.send(Ok(()));
                    if flags & FLAG_FIN != 0 {
                        s.recv_fin = true;
                    }
                    s.wake();
                    st.reap(stream_id);
                }
                // A second SYN_REPLY, or one for a stream the peer opened:
                // ignored, as spdystream does.
            }
            Next::Continue
        }
        Frame::Headers {
            stream_id, flags, ..
        } => {
            if flags & FLAG_FIN != 0 {
                if let Some(s) = st.streams.get_mut(&stream_id) {
                    s.recv_fin = true;
                    s.wake();
                    st.reap(stream_id);
                }
            }
            Next::Continue
        }
        Frame::RstStream { stream_id, status } => {
            if let Some(s) = st.streams.get_mut(&stream_id) {
                if s.reset.is_none() {
                    s.reset = Some(status);
                    if let Some(tx) = s.reply.take() {
                        let _ = tx.send(Err(SpdyError::StreamReset(status)));
                    }
                    s.wake();
                    // What already arrived stays readable.
                    if s.reader_gone {
                        st.discard(stream_id);
                    }
                    st.reap(stream_id);
                }
            }
            Next::Continue
        }
        Frame::Settings { entries, .. } => {
            st.peer_flow_control = true;
            for e in entries {
                if e.id == setting::INITIAL_WINDOW_SIZE {
                    let new = i64::from(e.value);
                    if new > MAX_WINDOW {
                        drop(guard);
                        fatal(inner, &SpdyError::Protocol("initial window too large"));
                        return Next::Stop;
                    }
                    let diff = new - st.peer_initial_window;
                    st.peer_initial_window = new;
                    for s in st.streams.values_mut() {
                        s.send_window += diff;
                    }
                }
            }
            st.wake_writers();
            Next::Continue
        }
        Frame::WindowUpdate { stream_id, delta } => {
            st.peer_flow_control = true;
            let delta = i64::from(delta);
            if stream_id == 0 {
                if st.send_window + delta > MAX_WINDOW {
                    drop(guard);
                    fatal(inner, &SpdyError::Protocol("session window overflow"));
                    return Next::Stop;
                }
                st.send_window += delta;
                st.wake_writers();
            } else if let Some(s) = st.streams.get_mut(&stream_id) {
                if s.send_window + delta > MAX_WINDOW {
                    st.reset_stream(stream_id, rst::FLOW_CONTROL_ERROR);
                } else {
                    s.send_window += delta;
                    if let Some(w) = s.write_waker.take() {
                        w.wake();
                    }
                }
            }
            Next::Continue
        }
        Frame::Ping { id } => {
            // Echo the peer's pings; ids of our parity would be replies to
            // pings we never send.
            if id & 1 != inner.role.parity() {
                st.out.push(Frame::Ping { id });
            }
            Next::Continue
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            tracing::debug!(
                "spdy: peer sent GOAWAY (last stream {last_good_stream_id}, status {status})"
            );
            st.begin_end();
            Next::Stop
        }
        Frame::Unknown { frame_type } => {
            tracing::debug!("spdy: ignoring control frame type {frame_type}");
            Next::Continue
        }
    };
    let flood = st.out.control > MAX_QUEUED_CONTROL;
    let wake_writer = st.out.frames.len() != queued;
    drop(guard);
    if flood {
        fatal(
            inner,
            &SpdyError::Protocol("peer is not reading our control frames"),
        );
        return Next::Stop;
    }
    if wake_writer {
        inner.writer_wake.notify_one();
    }
    next
}

fn on_data(st: &mut State, id: u32, flags: u8, data: &[u8]) -> Next {
    let n = data.len();
    st.recv_window -= n as i64;
    if st.peer_flow_control && st.recv_window < 0 {
        // A flow-controlling peer overran the session window.
        tracing::warn!("spdy: peer overran the session window");
        st.out.push(Frame::GoAway {
            last_good_stream_id: st.last_peer_stream_id,
            status: goaway::PROTOCOL_ERROR,
        });
        st.begin_end();
        return Next::Stop;
    }
    let enforce = st.peer_flow_control;
    let Some(s) = st.streams.get_mut(&id) else {
        // Closed or never opened: spdystream drops these silently too. The
        // bytes still count against the session window, so grant them back.
        st.credit(id, n);
        return Next::Continue;
    };
    if s.recv_fin {
        st.credit(id, n);
        st.reset_stream(id, rst::STREAM_ALREADY_CLOSED);
        return Next::Continue;
    }
    s.recv_window -= n as i64;
    if enforce && s.recv_window < 0 {
        st.credit(id, n);
        st.reset_stream(id, rst::FLOW_CONTROL_ERROR);
        return Next::Continue;
    }
    if s.reader_gone || s.reset.is_some() {
        if flags & FLAG_FIN != 0 {
            s.recv_fin = true;
        }
        st.credit(id, n);
        st.reap(id);
        return Next::Continue;
    }
    s.recv_buf.extend_from_slice(data);
    if flags & FLAG_FIN != 0 {
        s.recv_fin = true;
    }
    if let Some(w) = s.read_waker.take() {
        w.wake();
    }
    st.recv_buffered += n;
    st.reap(id);
    if st.recv_buffered > RECV_BUFFER {
        Next::WaitForSpace
    } else {
        Next::Continue
    }
}

fn on_syn_stream(inner: &Arc<Inner>, st: &mut State, id: u32, flags: u8, headers: Headers) -> Next {
    if id & 1 == inner.role.parity() || id <= st.last_peer_stream_id {
        // Wrong parity, or not increasing: refused as spdystream does.
        st.out.push(Frame::RstStream {
            stream_id: id,
            status: rst::PROTOCOL_ERROR,
        });
        return Next::Continue;
    }
    st.last_peer_stream_id = id;
    if st.streams.len() >= MAX_STREAMS || st.incoming.is_none() {
        st.out.push(Frame::RstStream {
            stream_id: id,
            status: rst::REFUSED_STREAM,
        });
        return Next::Continue;
    }
    let mut s = StreamState::new(st.peer_initial_window);
    s.recv_fin = flags & FLAG_FIN != 0;
    if flags & FLAG_UNIDIRECTIONAL != 0 {
        // We may not send on it, so there is nothing to reply.
        s.sent_fin = true;
    } else {
        st.out.push(Frame::SynReply {
            stream_id: id,
            flags: 0,
            headers: Vec::new(),
        });
    }
    st.streams.insert(id, s);
    Next::Deliver(SpdyStream::new(inner.clone(), id, headers))
}

async fn writer_task<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut wr: W) {
    let mut stop = inner.stop.subscribe();
    match FrameEncoder::new() {
        Ok(mut enc) => {
            let mut buf = BytesMut::with_capacity(WRITE_BATCH + MAX_DATA_FRAME);
            loop {
                let (batch, done) = {
                    let mut st = inner.lock();
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    while bytes < WRITE_BATCH {
                        let Some(frame) = st.out.pop() else { break };
                        if let Frame::Data { data, .. } = &frame {
                            bytes += data.len();
                        }
                        bytes += 16;
                        batch.push(frame);
                    }
                    if !batch.is_empty() {
                        st.wake_writers();
                    }
                    (batch, st.ending && st.out.frames.is_empty())
                };
                if batch.is_empty() {
                    if done {
                        break;
                    }
                    tokio::select! {
                        _ = inner.writer_wake.notified() => continue,
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                buf.clear();
                let mut encoded = Ok(());
                for frame in &batch {
                    encoded = enc.encode(frame, &mut buf);
                    if encoded.is_err() {
                        break;
                    }
                }
                if let Err(e) = encoded {
                    tracing::warn!("spdy: cannot encode a frame: {e}");
                    break;
                }
                let written = tokio::select! {
                    r = async {
                        wr.write_all(&buf).await?;
                        wr.flush().await
                    } => r,
                    _ = stop.wait_for(|s| *s) => break,
                };
                if let Err(e) = written {
                    tracing::debug!("spdy: write: {e}");
                    break;
                }
            }
        }
        Err(e) => tracing::warn!("spdy: cannot start the header compressor: {e}"),
    }
    {
        let mut st = inner.lock();
        st.begin_end();
        // Nothing will send these now; let blocked writers see the end.
        st.out = Outbox::default();
        st.wake_writers();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    drop(wr);
    // The connection cannot carry anything more: the reader stops too.
    inner.stop.send_replace(true);
    inner.task_done();
}
