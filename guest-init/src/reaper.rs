//! PID 1 must reap every zombie, its own children and the orphans the kernel
//! hands it. One thread blocks in `waitpid(-1)`; exits of processes the agent
//! started go to the callback registered for their pid, everything else is
//! reaped silently.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(2) with this code.
    Exited(i32),
    /// Killed by this signal.
    Signalled(i32),
}

impl ExitStatus {
    /// Decodes a wait(2) status word.
    pub fn from_raw(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            Self::Signalled(libc::WTERMSIG(status))
        } else {
            Self::Exited(libc::WEXITSTATUS(status))
        }
    }
}

type OnExit = Box<dyn FnOnce(ExitStatus) + Send>;

#[derive(Default)]
struct Table {
    /// Ordered, not hashed: no hash keys shared by every clone.
    watched: BTreeMap<i32, OnExit>,
    /// Set when a child may exist again after `waitpid` said ECHILD.
    kicked: bool,
}

/// The zombie reaper; one per agent process.
#[derive(Default)]
pub struct Reaper {
    table: Mutex<Table>,
    kick: Condvar,
}

impl Reaper {
    /// Creates the reaper and starts its thread.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let for_thread = Arc::clone(&reaper);
        thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || for_thread.run())?;
        Ok(reaper)
    }

    /// Runs `spawn` and registers `on_exit` for the pid it returns, with the
    /// table locked throughout: a child that exits at once is reaped by the
    /// reaper thread, but its status is only looked up after the
    /// registration, so no exit is lost or taken for an orphan's. A child
    /// left behind by a failed spawn (exec error) is reaped as an orphan.
    pub fn spawn_watched<E>(
        &self,
        spawn: impl FnOnce() -> Result<i32, E>,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> Result<i32, E> {
        let mut table = self.table();
        let result = spawn();
        if let Ok(pid) = result {
            table.watched.insert(pid, Box::new(on_exit));
        }
        table.kicked = true;
        self.kick.notify_one();
        result
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) writes the status into our local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
            if pid > 0 {
                let on_exit = self.table().watched.remove(&pid);
                if let Some(on_exit) = on_exit {
                    on_exit(ExitStatus::from_raw(status));
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => {
                    // No children: sleep until a spawn creates one. Orphans
                    // only appear while we have children, so none is missed.
                    let mut table = self.table();
                    while !table.kicked {
                        table = self
                            .kick
                            .wait(table)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    table.kicked = false;
                }
                _ => {
                    crate::log_error!("waitpid: {}", io::Error::last_os_error());
                    thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_status() {
        assert_eq!(ExitStatus::from_raw(3 << 8), ExitStatus::Exited(3));
        assert_eq!(ExitStatus::from_raw(0), ExitStatus::Exited(0));
        assert_eq!(ExitStatus::from_raw(9), ExitStatus::Signalled(9));
        assert_eq!(ExitStatus::from_raw(15 | 0x80), ExitStatus::Signalled(15));
    }
}
