//! Running a host tool (iptables) to its end from the pod runtime.
//!
//! The process the runtime lives in may reap children itself: a containerd
//! shim is a child subreaper whose SIGCHLD handler calls `waitpid(-1)`, so
//! `Command::output` could fail with ECHILD although the tool ran. The exit
//! status therefore comes from the front door's [`ChildExits`], listened to
//! *before* the spawn.

use std::io::{self, Read};
use std::process::{Child, Command, Stdio};
use std::thread;

use crate::exits::ExitListener;

/// What a finished tool left: its exit code (128 + signal for a signal)
/// and its output.
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

/// A tool whose output was read to its end; its exit is still to be
/// learnt ([`Ran::finish`]). Spawning and reading are synchronous, so they
/// can run on a thread that entered a pod's network namespace.
#[derive(Debug)]
pub struct Ran {
    child: Child,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Ran {
    /// Runs `cmd` with its output captured, until it closes both pipes.
    pub fn spawn_and_read(cmd: &mut Command) -> io::Result<Ran> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (stdout, stderr) = read_both(&mut child)?;
        Ok(Ran {
            child,
            stdout,
            stderr,
        })
    }

    /// Waits for the exit, learnt from `exit` (listened to before the
    /// spawn).
    pub async fn finish(self, exit: Box<dyn ExitListener>) -> Finished {
        Finished {
            code: exit.exit_of(self.child).await,
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::{ChildExits, OwnChildren};

    #[tokio::test]
    async fn output_and_code_of_a_tool() {
        let exit = OwnChildren.listen().await.unwrap();
        let ran =
            Ran::spawn_and_read(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
                .unwrap();
        let done = ran.finish(exit).await;
        assert_eq!(done.code, 3);
        assert!(!done.success());
        assert_eq!(done.stdout, b"out\n");
        assert_eq!(done.stderr, b"err\n");
    }

    #[test]
    fn a_tool_that_cannot_start_is_an_error() {
        let err = Ran::spawn_and_read(&mut Command::new("/nonexistent/arrow-tool")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
