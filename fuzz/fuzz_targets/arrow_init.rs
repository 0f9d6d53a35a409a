//! arrow-init's request handling, in-process: a fresh agent per input
//! serves one connection (`guest_init::agent::serve_connection`, the code
//! PID 1 runs per vsock connection) over a socketpair, fed a sequence of
//! requests: process calls on a few shared ids with arbitrary fields, any
//! request body as arbitrary protobuf bytes, then arbitrary trailing bytes.
//!
//! Never sent: StartProcess (it would execute the request's program, as
//! root, on this host) and Shutdown (it exits the process). Containers are
//! set unavailable after validation (creating one mounts and makes cgroups
//! on the host) and ConfigureNetwork only plans, as in host-test mode; the
//! clone platform is the recording fake.
//!
//! Oracles: no panic and no hang (the connection ends within a deadline
//! once the host side is closed); every request but the long polls
//! (WaitProcess, WaitOom) is answered exactly once, a long poll at most
//! once, and no answer carries an id that was not asked. Counters (printed
//! at exit) show how many calls were answered and how many succeeded, so a
//! campaign shows it gets past validation.

#![no_main]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use arbitrary::Arbitrary;
use arrow_fuzz::Counter;
use libfuzzer_sys::fuzz_target;
use prost::Message;

use guest_init::agent::{self, Agent, OnShutdown};
use guest_init::clone::RecordingPlatform;
use guest_init::conn::Conn;
use guest_init::container::{Containers, Layout};
use guest_init::reaper::Reaper;
use guest_init::supervisor::Supervisor;
use proto::agent::{
    request::Body, response, CloseStdin, CreateProcess, DeleteProcess, Request, ResizeTty,
    Response, Rlimit, SignalProcess, WaitProcess,
};

/// How long the agent may take to end the connection once the host side is
/// closed (libFuzzer's own -timeout would also catch a hang, later).
const DEADLINE: Duration = Duration::from_secs(5);

/// Answers read.
static ANSWERED: Counter = Counter::new("arrow_init calls answered");
/// Answers that are not an `Error`.
static SUCCEEDED: Counter = Counter::new("arrow_init calls succeeded");

/// Process ids the typed calls share, so they meet the same process.
const IDS: [&str; 4] = ["p0", "p1", "p2", "p3"];

#[derive(Arbitrary, Debug)]
struct Create {
    slot: u8,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    rlimits: Vec<(String, u64, u64)>,
    terminal: bool,
    stdin: bool,
    root: String,
    umask: Option<u32>,
    no_new_privs: bool,
    container_id: String,
    oom_score_adj: Option<i32>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create(Box<Create>),
    Wait(u8),
    Signal {
        slot: u8,
        signal: i32,
        all: bool,
    },
    Resize {
        slot: u8,
        rows: u32,
        cols: u32,
    },
    CloseStdin(u8),
    Delete(u8),
    /// Request body field `field` (2..=19, or 20..=21 which this agent
    /// does not know) holding `bytes`, decoded as a whole `Request`
    /// (unknown fields dropped, as the agent would).
    Body {
        field: u8,
        bytes: Vec<u8>,
    },
}

/// Written after the last frame: a frame that never completes (so it can
/// never smuggle in a request the target does not send).
#[derive(Arbitrary, Debug)]
enum Tail {
    None,
    /// The first 1 to 3 bytes of a length.
    Header(u8),
    /// A length `bytes.len() + 1 + missing`, then `bytes`.
    Body {
        missing: u32,
        bytes: Vec<u8>,
    },
}

impl Tail {
    fn write(&self, wire: &mut Vec<u8>) {
        match self {
            Tail::None => {}
            Tail::Header(n) => wire.extend(std::iter::repeat_n(0, usize::from(n % 3) + 1)),
            Tail::Body { missing, bytes } => {
                let len = (bytes.len() as u32)
                    .saturating_add(1)
                    .saturating_add(*missing);
                wire.extend_from_slice(&len.to_be_bytes());
                wire.extend_from_slice(bytes);
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    tail: Tail,
}

fn id(slot: u8) -> String {
    IDS[usize::from(slot) % IDS.len()].to_string()
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The body of `op` (None: a request without one), or None when the
/// bytes do not decode.
fn body(op: Op) -> Option<Option<Body>> {
    Some(Some(match op {
        Op::Create(c) => Body::CreateProcess(CreateProcess {
            id: id(c.slot),
            args: c.args,
            env: c.env,
            cwd: c.cwd,
            uid: c.uid,
            gid: c.gid,
            additional_gids: c.additional_gids,
            rlimits: c
                .rlimits
                .into_iter()
                .map(|(r#type, soft, hard)| Rlimit { r#type, soft, hard })
                .collect(),
            terminal: c.terminal,
            stdin: c.stdin,
            root: c.root,
            umask: c.umask,
            no_new_privs: c.no_new_privs,
            container_id: c.container_id,
            oom_score_adj: c.oom_score_adj,
            ..Default::default()
        }),
        Op::Wait(slot) => Body::WaitProcess(WaitProcess { id: id(slot) }),
        Op::Signal { slot, signal, all } => Body::SignalProcess(SignalProcess {
            id: id(slot),
            signal,
            all,
        }),
        Op::Resize { slot, rows, cols } => Body::ResizeTty(ResizeTty {
            id: id(slot),
            rows,
            cols,
        }),
        Op::CloseStdin(slot) => Body::CloseStdin(CloseStdin { id: id(slot) }),
        Op::Delete(slot) => Body::DeleteProcess(DeleteProcess { id: id(slot) }),
        Op::Body { field, bytes } => {
            let mut wire = Vec::with_capacity(bytes.len() + 8);
            varint(u64::from(2 + field % 20) << 3 | 2, &mut wire);
            varint(bytes.len() as u64, &mut wire);
            wire.extend_from_slice(&bytes);
            return Request::decode(&wire[..]).ok().map(|r| r.body);
        }
    }))
}

/// One reaper thread for the whole run (it reaps this process's children,
/// of which the target makes none).
fn reaper() -> Arc<Reaper> {
    static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();
    Arc::clone(REAPER.get_or_init(|| {
        // A write to a connection the other side closed must fail with
        // EPIPE, as it does in arrow-init (Rust's runtime ignores SIGPIPE
        // there; libFuzzer's main does not).
        // SAFETY: setting a signal disposition to SIG_IGN passes no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        Reaper::start().expect("start the reaper thread")
    }))
}

fn new_agent() -> Arc<Agent> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("open /dev/null");
    let supervisor = Arc::new(Supervisor::new(reaper(), null.into()));
    // Nothing here is ever created: containers are refused after their
    // spec is validated.
    let nowhere = Path::new("/nonexistent/arrow-fuzz");
    let layout = Layout {
        share: nowhere.join("shared"),
        share_device: None,
        containers: nowhere.join("containers"),
        cgroup_mount: None,
        cgroup_parent: nowhere.join("cgroup"),
        proc_sys: nowhere.join("sysctl"),
        dev_null: "/dev/null".into(),
        unavailable: Some("containers are not fuzzed (they mount on the host)".into()),
    };
    Arc::new(Agent::new(
        supervisor,
        Containers::new(layout),
        OnShutdown::Exit,
        Box::new(RecordingPlatform::new(1_700_000_000_000_000_000, "fuzz")),
    ))
}

fuzz_target!(|input: Input| {
    if input.ops.len() > 64 {
        return;
    }
    // Which requests were sent, by id: is it a long poll?
    let mut sent: BTreeMap<u64, bool> = BTreeMap::new();
    let mut created: Vec<String> = Vec::new();
    let mut wire = Vec::new();
    for op in input.ops {
        let Some(body) = body(op) else { continue };
        let long_poll = match &body {
            Some(Body::StartProcess(_) | Body::Shutdown(_)) => continue,
            Some(Body::CreateProcess(c)) => {
                created.push(c.id.clone());
                false
            }
            Some(Body::WaitProcess(_) | Body::WaitOom(_)) => true,
            _ => false,
        };
        let id = sent.len() as u64 + 1;
        sent.insert(id, long_poll);
        let req = Request { id, body };
        proto::write_frame(&mut wire, &req).expect("a request within the frame limit");
    }
    input.tail.write(&mut wire);

    let agent = new_agent();
    let (host, guest) = UnixStream::pair().expect("socketpair");
    host.set_read_timeout(Some(DEADLINE)).expect("SO_RCVTIMEO");
    let (done_tx, done_rx) = mpsc::channel();
    let server = Arc::clone(&agent);
    thread::Builder::new()
        .name("agent-conn".into())
        .spawn(move || {
            agent::serve_connection(&server, Conn::from_fd(guest.into()));
            let _ = done_tx.send(());
        })
        .expect("spawn the connection thread");
    // Written from its own thread: the agent's answers are read meanwhile.
    let mut writer = host.try_clone().expect("dup the host end");
    let feeder = thread::spawn(move || {
        // The agent may drop the connection at the tail: a failed write
        // is fine.
        let _ = writer.write_all(&wire);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });

    let mut answers: BTreeMap<u64, usize> = BTreeMap::new();
    let mut reader = &host;
    loop {
        match proto::read_frame::<Response, _>(&mut reader) {
            Ok(Some(resp)) => {
                ANSWERED.add(1);
                if !matches!(resp.result, Some(response::Result::Error(_))) {
                    SUCCEEDED.add(1);
                }
                *answers.entry(resp.id).or_default() += 1;
            }
            Ok(None) => break,
            Err(proto::FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("arrow-init did not end the connection within {DEADLINE:?}")
            }
            Err(e) => panic!("arrow-init wrote a bad frame: {e}"),
        }
    }
    feeder.join().expect("feeder thread");
    done_rx
        .recv_timeout(DEADLINE)
        .expect("the connection thread returns once the socket is shut down");

    for (id, n) in &answers {
        let long_poll = *sent
            .get(id)
            .unwrap_or_else(|| panic!("an answer to request {id}, which was not sent"));
        assert!(
            *n == 1 || (long_poll && *n == 0),
            "request {id} answered {n} times"
        );
    }
    // Every whole frame was read and answered before the tail ended the
    // connection.
    for (id, long_poll) in &sent {
        assert!(
            *long_poll || answers.contains_key(id),
            "request {id} was never answered"
        );
    }

    // Let waits on created processes end (as DeleteProcess would).
    for id in created {
        let _ = agent.supervisor().delete(&id);
    }
});
