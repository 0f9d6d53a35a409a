//! How the runtime learns that a child it spawned (a pod's `arrow-vmm`)
//! exited. It depends on the process the runtime lives in: a containerd
//! shim runs a reaper that reaps every child (`waitpid(-1)`) and publishes
//! their exits, so it must listen before the spawn (an exit reaped at once
//! would be missed otherwise); a process that reaps its own children just
//! waits on them ([`OwnChildren`]). The front door provides one.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Child;

use futures_util::future::BoxFuture;

/// A source of child exits.
pub trait ChildExits: Send + Sync {
    /// Starts listening for the exit of a child about to be spawned.
    fn listen(&self) -> BoxFuture<'_, io::Result<Box<dyn ExitListener>>>;
}

/// Listening for one child's exit; see [`ChildExits::listen`].
pub trait ExitListener: Send {
    /// Resolves to `child`'s exit code (128 + the signal if it was
    /// killed), whenever it exits.
    fn exit_of(self: Box<Self>, child: Child) -> BoxFuture<'static, i32>;
}

/// For a process that reaps its own children: waits on the child.
pub struct OwnChildren;

impl ChildExits for OwnChildren {
    fn listen(&self) -> BoxFuture<'_, io::Result<Box<dyn ExitListener>>> {
        Box::pin(async { Ok(Box::new(OwnChild) as Box<dyn ExitListener>) })
    }
}

struct OwnChild;

impl ExitListener for OwnChild {
    fn exit_of(self: Box<Self>, mut child: Child) -> BoxFuture<'static, i32> {
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || child.wait()).await {
                Ok(Ok(status)) => exit_code(status),
                // Someone else reaped it, or the wait failed: gone.
                _ => 255,
            }
        })
    }
}

/// A wait status as a shell reports it: the exit code, or 128 + signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[tokio::test]
    async fn own_children_report_codes_and_signals() {
        let listener = OwnChildren.listen().await.unwrap();
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        assert_eq!(listener.exit_of(child).await, 7);

        let listener = OwnChildren.listen().await.unwrap();
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let exit = tokio::spawn(listener.exit_of(child));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
        assert_eq!(exit.await.unwrap(), 128 + libc::SIGKILL);
    }
}
