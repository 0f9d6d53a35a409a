//! Child exits in a containerd shim: the containerd-shim crate's reaper
//! reaps every child (`waitpid(-1)` on SIGCHLD) and publishes their exits;
//! the runtime listens there ([`arrow_runtime::exits::ChildExits`]).

use std::io;
use std::process::Child;

use arrow_runtime::exits::{ChildExits, ExitListener};
use containerd_shim::asynchronous::monitor::{
    monitor_subscribe, monitor_unsubscribe, Subscription,
};
use containerd_shim::monitor::{Subject, Topic};
use futures_util::future::BoxFuture;

/// The shim's reaper as the runtime's source of child exits.
pub struct ReaperExits;

impl ChildExits for ReaperExits {
    fn listen(&self) -> BoxFuture<'_, io::Result<Box<dyn ExitListener>>> {
        Box::pin(async {
            let sub = monitor_subscribe(Topic::Pid)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok(Box::new(ReaperListener(sub)) as Box<dyn ExitListener>)
        })
    }
}

struct ReaperListener(Subscription);

impl ExitListener for ReaperListener {
    fn exit_of(self: Box<Self>, child: Child) -> BoxFuture<'static, i32> {
        let mut sub = self.0;
        let pid = child.id();
        // The reaper reaps it; the handle must not wait on it too.
        drop(child);
        Box::pin(async move {
            let mut code = 255;
            while let Some(event) = sub.rx.recv().await {
                if let Subject::Pid(p) = event.subject {
                    if p as u32 == pid {
                        code = event.exit_code;
                        break;
                    }
                }
            }
            let _ = monitor_unsubscribe(sub.id).await;
            code
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::asynchronous::monitor::monitor_notify_by_pid;
    use std::process::Command;

    /// The shim's reaper got there first: the code comes from its event.
    #[tokio::test]
    async fn the_exit_code_is_the_one_the_reaper_published() {
        let listener = ReaperExits.listen().await.unwrap();
        let mut child = Command::new("sh").args(["-c", "exit 5"]).spawn().unwrap();
        let pid = child.id();
        // Reap it as the shim's SIGCHLD handler would, then publish.
        let code = child.wait().unwrap().code().unwrap();
        let exit = tokio::spawn(listener.exit_of(child));
        monitor_notify_by_pid(pid as i32, code).await.unwrap();
        assert_eq!(exit.await.unwrap(), 5);
    }
}
