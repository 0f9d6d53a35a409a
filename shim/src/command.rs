//! Running a host tool (iptables) to its end from inside the shim.
//!
//! The shim is a child subreaper whose SIGCHLD handler (containerd-shim's
//! reaper) calls `waitpid(-1)`: it may reap a child before
//! `Command::output` waits for it, which then fails with ECHILD ("No child
//! processes") although the tool ran. So the caller subscribes to the
//! reaper's exits *before* spawning, and the exit status comes from
//! whichever of the two saw the child end.

use std::io::{self, Read};
use std::process::{Child, Command, Stdio};
use std::thread;

use containerd_shim::asynchronous::monitor::Subscription;
use containerd_shim::monitor::Subject;

/// What a finished tool left: its exit code (128 + signal for a signal, as
/// the reaper reports it) and its output.
#[derive(Debug)]
pub struct Finished {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Runs `cmd` with its output captured and waits for its end. `exits` must
/// have been subscribed (to `Topic::Pid`) before this call; it is read from
/// this thread, so this must not run on an async runtime's worker.
pub fn run_to_end(cmd: &mut Command, exits: &mut Subscription) -> io::Result<Finished> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (stdout, stderr) = read_both(&mut child)?;
    let code = match child.wait() {
        Ok(status) => exit_code(status),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => reaped_code(child.id(), exits)?,
        Err(e) => return Err(e),
    };
    Ok(Finished {
        code,
        stdout,
        stderr,
    })
}

/// Reads stdout here and stderr on a helper thread, so neither pipe can
/// fill up and stall the tool.
fn read_both(child: &mut Child) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut stderr_pipe = child.stderr.take();
    let stderr = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = stderr_pipe.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let mut stdout = Vec::new();
    if let Some(pipe) = child.stdout.as_mut() {
        pipe.read_to_end(&mut stdout)?;
    }
    let stderr = stderr
        .join()
        .map_err(|_| io::Error::other("the thread reading stderr panicked"))?;
    Ok((stdout, stderr))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// The exit code the reaper published for `pid`.
fn reaped_code(pid: u32, exits: &mut Subscription) -> io::Result<i32> {
    while let Some(event) = exits.rx.blocking_recv() {
        if matches!(event.subject, Subject::Pid(p) if p as u32 == pid) {
            return Ok(event.exit_code);
        }
    }
    Err(io::Error::other(format!(
        "pid {pid} was reaped by another waiter and its exit was not published"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::asynchronous::monitor::{monitor_notify_by_pid, monitor_subscribe};
    use containerd_shim::monitor::Topic;

    fn subscribe() -> Subscription {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(monitor_subscribe(Topic::Pid)).unwrap()
    }

    #[test]
    fn output_and_code_of_a_tool_nobody_else_reaps() {
        let mut exits = subscribe();
        let done = run_to_end(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            &mut exits,
        )
        .unwrap();
        assert_eq!(done.code, 3);
        assert!(!done.success());
        assert_eq!(done.stdout, b"out\n");
        assert_eq!(done.stderr, b"err\n");
    }

    /// The shim's reaper got there first: the code comes from its event.
    #[test]
    fn the_code_comes_from_the_reaper_when_it_reaped_first() {
        let mut exits = subscribe();
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Reap it as the shim's SIGCHLD handler would, then publish.
        child.wait().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(monitor_notify_by_pid(pid as i32, 0)).unwrap();
        assert_eq!(reaped_code(pid, &mut exits).unwrap(), 0);
    }
}
