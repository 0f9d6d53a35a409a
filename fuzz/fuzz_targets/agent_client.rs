//! The host's agent client against a scripted hostile guest: each request
//! the client writes releases the next scripted reply (an answer with the
//! request's id or another, a typed result with arbitrary contents, raw
//! bytes, silence, or a closed connection) to the client's reader thread.
//!
//! Oracles: no panic and no hang (a silent guest costs a call its
//! deadline; long polls end when the connection does); a reply with
//! another call's id never answers a call; once the connection is closed
//! every call fails.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

use proto::agent::{request, Request};
use proto::client::{AgentClient, ClientError};
use proto::read_frame;

#[derive(Arbitrary, Clone, Debug)]
enum Reply {
    /// A `Response` frame: `id` is the request's plus `id_offset`, then
    /// result field `variant` (2..=20) holding `inner`, then `tail`.
    Answer {
        id_offset: u8,
        variant: u8,
        inner: Vec<u8>,
        tail: Vec<u8>,
    },
    Raw(Vec<u8>),
    Silence,
    Close,
}

#[derive(Arbitrary, Debug)]
enum Call {
    Ping,
    Start,
    Signal(i32),
    Wait,
    Delete,
    Stats,
    Pids,
    WaitOom,
    InitClone(Vec<u8>),
    Shutdown,
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The guest's end: reads requests, answers from the script.
struct Guest {
    out: Option<Sender<Vec<u8>>>,
    script: VecDeque<Reply>,
    written: Vec<u8>,
    /// Raw bytes were sent: the framing may be lost (a declared length
    /// still waiting for its body swallows later answers).
    raw_sent: bool,
}

impl Write for Guest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.is_none() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut pending = self.written.as_slice();
        let mut requests = Vec::new();
        while let Ok(Some(req)) = read_frame::<Request, _>(&mut pending) {
            requests.push(req);
        }
        self.written.clear();
        for req in requests {
            let long_poll = matches!(
                req.body,
                Some(request::Body::WaitProcess(_)) | Some(request::Body::WaitOom(_))
            );
            let reply = self.script.pop_front().unwrap_or(Reply::Close);
            // A long poll waits for its answer as long as the connection
            // lives (by design): a guest that answers it with anything
            // but its own id then closes, or the call would never end.
            let answers = matches!(
                &reply,
                Reply::Answer { id_offset: 0, tail, .. } if tail.is_empty()
            );
            let close_after = long_poll && (!answers || self.raw_sent);
            self.raw_sent |= matches!(reply, Reply::Raw(_));
            let bytes = match reply {
                Reply::Answer {
                    id_offset,
                    variant,
                    inner,
                    tail,
                } => {
                    let mut body = vec![0x08];
                    varint(req.id.wrapping_add(u64::from(id_offset)), &mut body);
                    body.push(((2 + variant % 19) << 3) | 2);
                    varint(inner.len() as u64, &mut body);
                    body.extend(inner);
                    body.extend(tail);
                    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
                    frame.extend(body);
                    frame
                }
                Reply::Raw(bytes) => bytes,
                Reply::Silence if !long_poll => continue,
                Reply::Silence | Reply::Close => {
                    self.out = None;
                    return Ok(());
                }
            };
            if let Some(out) = &self.out {
                let _ = out.send(bytes);
            }
            if close_after {
                self.out = None;
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The client's reader: the guest's replies, EOF once the guest closed.
struct Replies {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for Replies {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.buf.len() - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fuzz_target!(|script: Vec<(Call, Reply)>| {
    if script.len() > 32 {
        return;
    }
    let (tx, rx) = channel();
    let guest = Guest {
        out: Some(tx),
        script: script.iter().map(|(_, r)| r.clone()).collect(),
        written: Vec::new(),
        raw_sent: false,
    };
    let reader = Replies {
        rx,
        buf: Vec::new(),
        pos: 0,
    };
    let client = AgentClient::new(reader, guest)
        .and_then(|c| c.with_call_timeout(Duration::from_millis(5)))
        .expect("client");
    let mut closed = false;
    for (call, reply) in script {
        let result: Result<(), ClientError> = match &call {
            Call::Ping => client.ping().map(drop),
            Call::Start => client.start_process("p").map(drop),
            Call::Signal(s) => client.signal("p", *s, false),
            Call::Wait => client.wait("p").map(drop),
            Call::Delete => client.delete_process("p"),
            Call::Stats => client.container_stats("c").map(drop),
            Call::Pids => client.list_pids("c").map(drop),
            Call::WaitOom => client.wait_oom().map(drop),
            Call::InitClone(entropy) => client.init_clone(1, entropy, "h").map(drop),
            Call::Shutdown => client.shutdown(),
        };
        if closed {
            assert!(
                matches!(result, Err(ClientError::ConnectionClosed(_)))
                    || matches!(call, Call::Shutdown),
                "a call after the close gave {result:?}"
            );
        }
        if let Reply::Answer {
            id_offset, tail, ..
        } = &reply
        {
            // (`shutdown` counts a closed connection as done.)
            if *id_offset != 0 && tail.is_empty() && !matches!(call, Call::Shutdown) {
                assert!(result.is_err(), "a reply to another id answered {call:?}");
            }
        }
        if matches!(result, Err(ClientError::ConnectionClosed(_))) {
            closed = true;
        }
    }
    drop(client);
});
