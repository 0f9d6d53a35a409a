//! Runs the real arrow-init agent on Unix sockets (`--listen-unix`) and
//! drives it with `proto::client::AgentClient`, as the shim would over vsock.
//! Needs root for the credential test (we run as root here).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use proto::agent::{CreateProcess, Request, Rlimit, StreamKind};
use proto::client::{AgentClient, ClientError};

/// One agent process in its own directory, killed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "arrow-init-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // ARROW_INIT_BIN runs the suite against another build (e.g. the
        // static release binary).
        let bin = std::env::var_os("ARROW_INIT_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_arrow-init").into());
        let child = Command::new(bin)
            .arg("--listen-unix")
            .arg(&dir)
            .spawn()
            .unwrap();
        let agent = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        // forward.sock is bound last.
        while !agent.dir.join("forward.sock").exists() {
            assert!(Instant::now() < deadline, "agent did not come up");
            thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> AgentClient {
        AgentClient::from_unix(self.raw_agent_conn()).unwrap()
    }

    fn raw_agent_conn(&self) -> UnixStream {
        UnixStream::connect(self.dir.join("agent.sock")).unwrap()
    }

    fn attach(&self, id: &str, kind: StreamKind) -> Result<UnixStream, ClientError> {
        let conn = UnixStream::connect(self.dir.join("stdio.sock")).unwrap();
        AgentClient::attach_stream(conn, id, kind)
    }

    fn port_forward(&self, port: u16) -> Result<UnixStream, ClientError> {
        let conn = UnixStream::connect(self.dir.join("forward.sock")).unwrap();
        proto::client::port_forward_unix_stream(conn, port, Duration::from_secs(10))
    }

    /// Attaches `kind` and collects everything until EOF on a thread.
    fn collect(&self, id: &str, kind: StreamKind) -> JoinHandle<Vec<u8>> {
        let mut stream = self.attach(id, kind).unwrap();
        thread::spawn(move || {
            let mut out = Vec::new();
            stream.read_to_end(&mut out).unwrap();
            out
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(id: &str, script: &str) -> CreateProcess {
    CreateProcess {
        id: id.into(),
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        ..Default::default()
    }
}

/// Runs `req` with stdout/stderr attached; returns (stdout, stderr, exit).
fn run(agent: &Agent, client: &AgentClient, req: CreateProcess) -> (String, String, (i32, i32)) {
    let id = req.id.clone();
    client.create_process(req).unwrap();
    let out = agent.collect(&id, StreamKind::Stdout);
    let err = agent.collect(&id, StreamKind::Stderr);
    client.start_process(&id).unwrap();
    let exited = client.wait(&id).unwrap();
    let text = |h: JoinHandle<Vec<u8>>| String::from_utf8(h.join().unwrap()).unwrap();
    (text(out), text(err), (exited.exit_code, exited.signal))
}

#[test]
fn echo_and_exit_code() {
    let agent = Agent::start();
    let client = agent.client();
    let pong = client.ping().unwrap();
    assert_eq!(pong.version, env!("CARGO_PKG_VERSION"));
    let (out, err, status) = run(&agent, &client, sh("p", "echo hi; echo oops >&2; exit 3"));
    assert_eq!(
        (out.as_str(), err.as_str(), status),
        ("hi\n", "oops\n", (3, 0))
    );
    client.delete_process("p").unwrap();
    assert!(matches!(client.wait("p"), Err(ClientError::NotFound(_))));
}

#[test]
fn unattached_output_goes_nowhere() {
    let agent = Agent::start();
    let client = agent.client();
    client.create_process(sh("p", "echo lost; exit 0")).unwrap();
    client.start_process("p").unwrap();
    let exited = client.wait("p").unwrap();
    assert_eq!((exited.exit_code, exited.signal), (0, 0));
}

#[test]
fn stdin_reaches_cat() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh("cat", "cat");
    req.stdin = true;
    client.create_process(req).unwrap();
    let mut stdin = agent.attach("cat", StreamKind::Stdin).unwrap();
    let out = agent.collect("cat", StreamKind::Stdout);
    client.start_process("cat").unwrap();
    stdin.write_all(b"hello\nworld\n").unwrap();
    // Closing the stream is EOF to the process.
    drop(stdin);
    let exited = client.wait("cat").unwrap();
    assert_eq!((exited.exit_code, exited.signal), (0, 0));
    assert_eq!(out.join().unwrap(), b"hello\nworld\n");
}

#[test]
fn close_stdin_without_a_stream() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh("cat", "cat; echo done");
    req.stdin = true;
    client.create_process(req).unwrap();
    let out = agent.collect("cat", StreamKind::Stdout);
    client.start_process("cat").unwrap();
    client.close_stdin("cat").unwrap();
    assert_eq!(client.wait("cat").unwrap().exit_code, 0);
    assert_eq!(out.join().unwrap(), b"done\n");
}

#[test]
fn close_stdin_ends_an_attached_stream() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh("cat", "cat");
    req.stdin = true;
    client.create_process(req).unwrap();
    let mut stdin = agent.attach("cat", StreamKind::Stdin).unwrap();
    let out = agent.collect("cat", StreamKind::Stdout);
    client.start_process("cat").unwrap();
    stdin.write_all(b"abc").unwrap();
    // Let the bytes reach the agent before stdin is cut.
    thread::sleep(Duration::from_millis(200));
    client.close_stdin("cat").unwrap();
    assert_eq!(client.wait("cat").unwrap().exit_code, 0);
    assert_eq!(out.join().unwrap(), b"abc");
}

#[test]
fn sigkill_reports_signal_and_wait_blocks_only_itself() {
    let agent = Agent::start();
    let client = agent.client();
    client
        .create_process(CreateProcess {
            id: "sleeper".into(),
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        })
        .unwrap();
    let pid = client.start_process("sleeper").unwrap();
    assert!(pid > 1);
    thread::scope(|s| {
        let waiter = s.spawn(|| client.wait("sleeper").unwrap());
        // The same connection keeps serving while the wait is pending.
        for _ in 0..3 {
            client.ping().unwrap();
        }
        assert!(!waiter.is_finished());
        client.signal("sleeper", libc::SIGKILL, false).unwrap();
        let exited = waiter.join().unwrap();
        assert_eq!((exited.exit_code, exited.signal), (-1, 9));
    });
    assert!(matches!(
        client.signal("sleeper", libc::SIGTERM, false),
        Err(ClientError::NotFound(_))
    ));
}

#[test]
fn signal_all_reaches_the_process_group() {
    let agent = Agent::start();
    let client = agent.client();
    // The background sleep holds stdout: only killing the group ends it
    // quickly.
    client
        .create_process(sh("grp", "sleep 100 & sleep 100"))
        .unwrap();
    let out = agent.collect("grp", StreamKind::Stdout);
    client.start_process("grp").unwrap();
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    client.signal("grp", libc::SIGKILL, true).unwrap();
    let exited = client.wait("grp").unwrap();
    assert_eq!(exited.signal, 9);
    out.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn tty_process_sees_a_terminal_of_the_right_size() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh("tty", "tty; stty size");
    req.terminal = true;
    client.create_process(req).unwrap();
    assert!(matches!(
        agent.attach("tty", StreamKind::Stderr),
        Err(ClientError::InvalidArgument(_))
    ));
    let out = agent.collect("tty", StreamKind::Stdout);
    client.resize_tty("tty", 40, 100).unwrap();
    client.start_process("tty").unwrap();
    assert_eq!(client.wait("tty").unwrap().exit_code, 0);
    let out = String::from_utf8(out.join().unwrap()).unwrap();
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
}

#[test]
fn tty_stdin_reaches_the_process() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh("tty", "read line; echo got:$line");
    req.terminal = true;
    client.create_process(req).unwrap();
    let mut stdin = agent.attach("tty", StreamKind::Stdin).unwrap();
    let out = agent.collect("tty", StreamKind::Stdout);
    client.start_process("tty").unwrap();
    stdin.write_all(b"xyz\n").unwrap();
    assert_eq!(client.wait("tty").unwrap().exit_code, 0);
    let out = String::from_utf8(out.join().unwrap()).unwrap();
    assert!(out.contains("got:xyz"), "{out:?}");
}

#[test]
fn output_right_before_exit_is_not_lost() {
    let agent = Agent::start();
    let client = agent.client();
    let (out, _, status) = run(
        &agent,
        &client,
        sh("big", "head -c 1000000 /dev/zero | tr '\\0' a; exit 0"),
    );
    assert_eq!(status, (0, 0));
    assert_eq!(out.len(), 1_000_000);
    assert!(out.bytes().all(|b| b == b'a'));
}

#[test]
fn process_settings_are_applied() {
    let agent = Agent::start();
    let client = agent.client();
    let mut req = sh(
        "cfg",
        "pwd; umask; ulimit -n; echo $FOO; id -u; id -g; id -G",
    );
    req.cwd = "/tmp".into();
    req.env.push("FOO=bar".into());
    req.umask = Some(0o027);
    req.rlimits = vec![Rlimit {
        r#type: "RLIMIT_NOFILE".into(),
        soft: 123,
        hard: 456,
    }];
    req.uid = 1234;
    req.gid = 2345;
    req.additional_gids = vec![3456, 4567];
    req.no_new_privs = true;
    let (out, err, status) = run(&agent, &client, req);
    assert_eq!(status, (0, 0), "stderr: {err}");
    assert_eq!(out, "/tmp\n0027\n123\nbar\n1234\n2345\n2345 3456 4567\n");
}

#[test]
fn chroot_into_root() {
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipped: no static /bin/busybox");
        return;
    }
    let agent = Agent::start();
    let client = agent.client();
    let root = agent.dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("marker"), "inside\n").unwrap();
    let req = CreateProcess {
        id: "chroot".into(),
        args: vec![
            "busybox".into(),
            "sh".into(),
            "-c".into(),
            "busybox cat /marker; busybox pwd".into(),
        ],
        env: vec!["PATH=/bin".into()],
        root: root.to_str().unwrap().into(),
        cwd: "/work".into(),
        ..Default::default()
    };
    let (out, err, status) = run(&agent, &client, req);
    assert_eq!(status, (0, 0), "stderr: {err}");
    assert_eq!(out, "inside\n/work\n");
}

/// Zombies of the agent's children (pid, state) across all its threads.
fn children_of(pid: u32) -> Vec<String> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        children.extend(text.split_whitespace().map(str::to_string));
    }
    children
}

#[test]
fn orphans_are_reaped() {
    let agent = Agent::start();
    let client = agent.client();
    // The subshell outlives its parent and is re-parented to the agent.
    client
        .create_process(sh("orphan", "(sleep 0.2; exit 5) & exit 0"))
        .unwrap();
    client.start_process("orphan").unwrap();
    assert_eq!(client.wait("orphan").unwrap().exit_code, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !children_of(agent.child.id()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: {:?}",
            children_of(agent.child.id())
        );
        thread::sleep(Duration::from_millis(50));
    }
    client.ping().unwrap();
}

#[test]
fn exec_failure_is_reported() {
    let agent = Agent::start();
    let client = agent.client();
    client
        .create_process(CreateProcess {
            id: "nope".into(),
            args: vec!["/no/such/binary".into()],
            ..Default::default()
        })
        .unwrap();
    let err = client.start_process("nope").unwrap_err();
    assert!(
        matches!(&err, ClientError::FailedPrecondition(m) if m.contains("exec")),
        "{err}"
    );
    assert_eq!(client.wait("nope").unwrap().exit_code, 127);
    // The agent is fine afterwards.
    client.ping().unwrap();
}

#[test]
fn lifecycle_errors() {
    let agent = Agent::start();
    let client = agent.client();
    assert!(matches!(
        client.wait("ghost"),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        client.start_process("ghost"),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        agent.attach("ghost", StreamKind::Stdout),
        Err(ClientError::NotFound(_))
    ));
    client.create_process(sh("dup", "exit 0")).unwrap();
    assert!(matches!(
        client.create_process(sh("dup", "exit 0")),
        Err(ClientError::AlreadyExists(_))
    ));
    assert!(matches!(
        client.create_process(CreateProcess {
            id: "bad".into(),
            ..Default::default()
        }),
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        client.signal("dup", libc::SIGTERM, false),
        Err(ClientError::FailedPrecondition(_))
    ));
    assert!(matches!(
        client.resize_tty("dup", 1, 1),
        Err(ClientError::FailedPrecondition(_))
    ));
    assert!(matches!(
        agent.attach("dup", StreamKind::Stdin),
        Err(ClientError::FailedPrecondition(_))
    ));
    let _out = agent.attach("dup", StreamKind::Stdout).unwrap();
    assert!(matches!(
        agent.attach("dup", StreamKind::Stdout),
        Err(ClientError::AlreadyExists(_))
    ));
    client.start_process("dup").unwrap();
    assert!(matches!(
        client.start_process("dup"),
        Err(ClientError::FailedPrecondition(_))
    ));
    assert!(matches!(
        agent.attach("dup", StreamKind::Stderr),
        Err(ClientError::FailedPrecondition(_))
    ));
    client.wait("dup").unwrap();
    client.delete_process("dup").unwrap();
    assert!(matches!(
        client.delete_process("dup"),
        Err(ClientError::NotFound(_))
    ));
}

#[test]
fn malformed_frames_drop_only_that_connection() {
    let agent = Agent::start();
    let cases: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff],            // length over the limit
        &[0, 0, 0, 100, 1, 2, 3, 4, 5, 6, 7], // truncated, then EOF
        &[0, 0, 0, 3, 0xff, 0xff, 0xff],      // undecodable body
    ];
    for bytes in cases {
        let mut conn = agent.raw_agent_conn();
        conn.write_all(bytes).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "agent answered garbage with {rest:?}");
    }
    // Garbage on a stdio connection too.
    let mut conn = UnixStream::connect(agent.dir.join("stdio.sock")).unwrap();
    conn.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    // An empty request body is answered with an error, not a hang-up.
    let mut conn = agent.raw_agent_conn();
    proto::write_frame(&mut conn, &Request { id: 5, body: None }).unwrap();
    let resp: proto::agent::Response = proto::read_frame(&mut conn).unwrap().unwrap();
    assert_eq!(resp.id, 5);
    assert!(matches!(
        resp.result,
        Some(proto::agent::response::Result::Error(_))
    ));
    // The agent survived all of it.
    agent.client().ping().unwrap();
}

#[test]
fn many_connections_at_once() {
    let agent = Agent::start();
    thread::scope(|s| {
        for i in 0..8 {
            let agent = &agent;
            s.spawn(move || {
                let client = agent.client();
                let id = format!("p{i}");
                let (out, _, status) = run(agent, &client, sh(&id, &format!("echo {i}")));
                assert_eq!((out, status), (format!("{i}\n"), (0, 0)));
            });
        }
    });
}

#[test]
fn shutdown_exits_the_test_agent() {
    let mut agent = Agent::start();
    let client = agent.client();
    client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        thread::sleep(Duration::from_millis(10));
    }
}

/// What the agent's fake clone platform recorded (`--listen-unix` mode).
fn clone_journal(agent: &Agent) -> Vec<String> {
    std::fs::read_to_string(agent.dir.join(guest_init::init::CLONE_JOURNAL))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
}

#[test]
fn init_clone_applies_through_the_fake_and_leaves_the_host_alone() {
    let host_name = host_hostname();
    let agent = Agent::start();
    let client = agent.client();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // 2001-09-09: a clock the host would never accept quietly.
    let clone_time = 1_000_000_000_000_000_000;
    let entropy = proto::client::fresh_entropy(64).unwrap();
    let done = client.init_clone(clone_time, &entropy, "clone-7").unwrap();
    // The fake starts from the host's clock, as a template's stale one.
    assert!(
        done.previous_unix_time_ns.abs_diff(host_now) < 60_000_000_000,
        "{} vs {host_now}",
        done.previous_unix_time_ns
    );
    assert_eq!(done.entropy_bytes, 64);
    assert_eq!(done.hostname, "clone-7");
    assert_eq!(
        clone_journal(&agent),
        [
            format!("set_wall_clock {clone_time}"),
            "add_entropy 64".into(),
            "reseed_crng".into(),
            "set_hostname clone-7".into(),
        ]
    );

    // Again, keeping the hostname: the clock reads what was set.
    let again = client
        .init_clone(clone_time + 5, &entropy[..32], "")
        .unwrap();
    assert!((clone_time..clone_time + 60_000_000_000).contains(&again.previous_unix_time_ns));
    assert_eq!(
        (again.entropy_bytes, again.hostname.as_str()),
        (32, "clone-7")
    );
    assert_eq!(clone_journal(&agent).len(), 7);

    // The host kept its own.
    assert_eq!(host_hostname(), host_name);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(after >= host_now);
    // Uptime is the agent's (here the host's) boot time, not the wall clock.
    assert!(client.ping().unwrap().uptime_ms > 0);
}

#[test]
fn init_clone_refuses_bad_fields_and_applies_nothing() {
    let agent = Agent::start();
    let client = agent.client();
    let good = proto::client::fresh_entropy(proto::CLONE_ENTROPY_MIN).unwrap();
    let long = vec![1u8; proto::CLONE_ENTROPY_MAX + 1];
    let long_name = "h".repeat(proto::HOSTNAME_MAX + 1);
    let cases: [(u64, &[u8], &str); 6] = [
        (0, &good, "h"),
        (u64::MAX, &good, "h"),
        (1, &good[..31], "h"),
        (1, &long, "h"),
        (1, &good, &long_name),
        (1, &good, "a\0b"),
    ];
    for (time, entropy, name) in cases {
        let err = client.init_clone(time, entropy, name).unwrap_err();
        assert!(
            matches!(err, ClientError::InvalidArgument(_)),
            "({time}, {} bytes, {name:?}): {err}",
            entropy.len()
        );
    }
    assert!(clone_journal(&agent).is_empty());
    client.ping().unwrap();
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// As after a snapshot restore, when the vsock transport reset kills every
/// connection under the agent: connections cut mid-call end their threads,
/// and the agent keeps serving new ones.
#[test]
fn connections_cut_mid_call_leave_the_agent_serving() {
    let mut agent = Agent::start();
    let pid = agent.child.id();
    let client = agent.client();
    client.ping().unwrap();
    let baseline = thread_count(pid);

    // 1. Cut inside a frame.
    let mut conn = agent.raw_agent_conn();
    conn.write_all(&[0, 0, 0, 50, 8, 1]).unwrap();
    conn.shutdown(std::net::Shutdown::Both).unwrap();

    // 2. Cut while a WaitProcess is pending: its answer later meets a dead
    // connection.
    client
        .create_process(CreateProcess {
            id: "sleeper".into(),
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        })
        .unwrap();
    client.start_process("sleeper").unwrap();
    let mut conn = agent.raw_agent_conn();
    let wait = Request {
        id: 1,
        body: Some(proto::agent::request::Body::WaitProcess(
            proto::agent::WaitProcess {
                id: "sleeper".into(),
            },
        )),
    };
    proto::write_frame(&mut conn, &wait).unwrap();
    thread::sleep(Duration::from_millis(100));
    conn.shutdown(std::net::Shutdown::Both).unwrap();

    // 3. Cut a client with a call in flight.
    let stream = agent.raw_agent_conn();
    let cutter = stream.try_clone().unwrap();
    let doomed = AgentClient::from_unix(stream).unwrap();
    thread::scope(|s| {
        let call = s.spawn(|| doomed.wait("sleeper"));
        thread::sleep(Duration::from_millis(100));
        cutter.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(matches!(
            call.join().unwrap(),
            Err(ClientError::ConnectionClosed(_))
        ));
    });

    // 4. Cut an output stream mid-stream and a stdin stream: the process
    // keeps running (its output is discarded, no SIGPIPE), stdin sees EOF.
    client
        .create_process(sh("chatty", "while :; do echo x; done"))
        .unwrap();
    let mut out = agent.attach("chatty", StreamKind::Stdout).unwrap();
    client.start_process("chatty").unwrap();
    let mut some = [0u8; 64];
    out.read_exact(&mut some).unwrap();
    out.shutdown(std::net::Shutdown::Both).unwrap();
    let mut req = sh("cat", "cat; echo eof >&2");
    req.stdin = true;
    client.create_process(req).unwrap();
    let stdin = agent.attach("cat", StreamKind::Stdin).unwrap();
    client.start_process("cat").unwrap();
    stdin.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(client.wait("cat").unwrap().exit_code, 0);
    thread::sleep(Duration::from_millis(200));
    client.signal("chatty", 0, false).unwrap();

    // Kill what runs; the pending waits answer into dead connections.
    client.signal("chatty", libc::SIGKILL, true).unwrap();
    client.signal("sleeper", libc::SIGKILL, false).unwrap();
    assert_eq!(client.wait("chatty").unwrap().signal, libc::SIGKILL);
    assert_eq!(client.wait("sleeper").unwrap().signal, libc::SIGKILL);

    // The agent is alive, serves new connections, and every connection
    // thread of the cut connections has ended.
    assert!(agent.child.try_wait().unwrap().is_none());
    let fresh = agent.client();
    fresh.ping().unwrap();
    let (out, _, status) = run(&agent, &fresh, sh("after", "echo still here"));
    assert_eq!((out.as_str(), status), ("still here\n", (0, 0)));
    drop(fresh);
    let deadline = Instant::now() + Duration::from_secs(5);
    while thread_count(pid) > baseline {
        assert!(
            Instant::now() < deadline,
            "{} threads left, {baseline} before",
            thread_count(pid)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// On a host, ConfigureNetwork checks the request as in the guest but never
/// touches the host's interfaces: a valid one is FAILED_PRECONDITION.
#[test]
fn configure_network_is_checked_and_refused_on_a_host() {
    use proto::agent::{ConfigureNetwork, Interface, IpAddress};
    let agent = Agent::start();
    let client = agent.client();
    let mut req = ConfigureNetwork {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: vec![0x0a, 0x58, 0, 0, 0, 9],
            mtu: 1500,
            addresses: vec![IpAddress {
                address: "10.88.0.9".into(),
                prefix_len: 16,
            }],
        }],
        routes: Vec::new(),
    };
    let err = client.configure_network(req.clone()).unwrap_err();
    assert!(
        matches!(&err, ClientError::FailedPrecondition(m) if m.contains("guest")),
        "{err:?}"
    );
    req.interfaces[0].mac = vec![1; 6];
    let err = client.configure_network(req).unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidArgument(m) if m.contains("unicast")),
        "{err:?}"
    );
}

#[test]
fn port_forward_serves_parallel_connections_and_refuses_closed_ports() {
    use std::net::{Shutdown, TcpListener};
    let agent = Agent::start();
    // An echo server that upper-cases, one thread per connection.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in server.incoming() {
            let mut s = s.unwrap();
            thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(&got.to_ascii_uppercase()).unwrap();
            });
        }
    });
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let mut stream = agent.port_forward(port).unwrap();
            thread::spawn(move || {
                let data = format!("connection {i} ").repeat(10_000);
                stream.write_all(data.as_bytes()).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut back = String::new();
                stream.read_to_string(&mut back).unwrap();
                assert_eq!(back, data.to_uppercase());
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match agent.port_forward(closed) {
        Err(ClientError::Unavailable(msg)) => assert!(msg.contains("refused"), "{msg}"),
        other => panic!("closed port: {:?}", other.map(|_| ())),
    }
    match agent.port_forward(0) {
        Err(ClientError::InvalidArgument(_)) => {}
        other => panic!("port 0: {:?}", other.map(|_| ())),
    }
    // The agent still serves.
    agent.client().ping().unwrap();
}
