//! OOM kills, for `WaitOom`: one inotify instance watches every container's
//! memory.events (the kernel reports each change as IN_MODIFY), a thread
//! turns growth of its "oom_kill" count into queued events, and WaitOom
//! calls take them oldest first. The thread starts with the first watch,
//! so a guest without containers pays nothing.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use super::cgroup::keyed;
use crate::{log_debug, log_error};

/// Unreported kills kept at most; the oldest go first beyond that.
const MAX_QUEUED: usize = 1024;
/// A safety net only: waiters are woken when their connection closes
/// ([`OomWatcher::wake_all`]), so an idle guest does not tick.
const RECHECK: Duration = Duration::from_secs(60);

struct Watch {
    container: String,
    path: PathBuf,
    /// The oom_kill count already queued.
    seen: u64,
}

#[derive(Default)]
struct State {
    inotify: Option<Arc<OwnedFd>>,
    /// By watch descriptor. Ordered maps only: nothing hashed in a clone.
    watches: BTreeMap<i32, Watch>,
    queue: VecDeque<String>,
}

/// The OOM watcher of the agent.
#[derive(Default)]
pub struct OomWatcher {
    state: Mutex<State>,
    ready: Condvar,
}

fn oom_kills(path: &Path) -> Option<u64> {
    keyed(&std::fs::read_to_string(path).ok()?, "oom_kill")
}

impl OomWatcher {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts watching a container's memory.events. Kills counted before
    /// this call are not reported.
    pub fn watch(self: &Arc<Self>, container: &str, memory_events: &Path) -> io::Result<()> {
        let mut st = self.state();
        let fd = match &st.inotify {
            Some(fd) => Arc::clone(fd),
            None => {
                // SAFETY: inotify_init1 takes flags and returns a new fd.
                let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
                if raw == -1 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh fd nobody else owns.
                let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
                let (me, for_thread) = (Arc::clone(self), Arc::clone(&fd));
                thread::Builder::new()
                    .name("oom-watch".into())
                    .stack_size(64 * 1024)
                    .spawn(move || me.run(&for_thread))?;
                st.inotify = Some(Arc::clone(&fd));
                fd
            }
        };
        let seen = oom_kills(memory_events).unwrap_or(0);
        let cpath = CString::new(memory_events.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid C string and our inotify fd.
        let wd =
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) };
        if wd == -1 {
            return Err(io::Error::last_os_error());
        }
        st.watches.insert(
            wd,
            Watch {
                container: container.to_string(),
                path: memory_events.to_path_buf(),
                seen,
            },
        );
        Ok(())
    }

    /// Stops watching a container, first queueing kills not seen yet (its
    /// last notification may still be in flight).
    pub fn unwatch(&self, container: &str) {
        let mut st = self.state();
        let wds: Vec<i32> = st
            .watches
            .iter()
            .filter(|(_, w)| w.container == container)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            self.check(&mut st, wd);
            st.watches.remove(&wd);
            if let Some(fd) = &st.inotify {
                // SAFETY: inotify_rm_watch takes plain integers.
                unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
            }
        }
    }

    /// Takes the oldest unreported kill, blocking while there is none and
    /// `keep_waiting` says the caller still wants one.
    pub fn wait(&self, keep_waiting: impl Fn() -> bool) -> Option<String> {
        let mut st = self.state();
        loop {
            if let Some(id) = st.queue.pop_front() {
                return Some(id);
            }
            if !keep_waiting() {
                return None;
            }
            st = self
                .ready
                .wait_timeout(st, RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Makes every waiter check `keep_waiting` again (a connection closed).
    /// Under the lock, so a waiter between its check and its sleep cannot
    /// miss it.
    pub fn wake_all(&self) {
        let _st = self.state();
        self.ready.notify_all();
    }

    /// Puts back a kill taken by `wait` whose answer could not be sent.
    pub fn requeue(&self, container: String) {
        self.state().queue.push_front(container);
        self.ready.notify_one();
    }

    /// Queues the growth of one watch's oom_kill count.
    fn check(&self, st: &mut State, wd: i32) {
        let Some(watch) = st.watches.get_mut(&wd) else {
            return;
        };
        // A file caught mid-update reads as nothing new; counts only grow.
        let Some(now) = oom_kills(&watch.path) else {
            return;
        };
        if now <= watch.seen {
            return;
        }
        let new = now - watch.seen;
        watch.seen = now;
        let container = watch.container.clone();
        log_debug!("container {container}: {new} OOM kill(s)");
        for _ in 0..new.min(MAX_QUEUED as u64) {
            if st.queue.len() == MAX_QUEUED {
                st.queue.pop_front();
            }
            st.queue.push_back(container.clone());
        }
        self.ready.notify_all();
    }

    /// The watcher thread: reads inotify events forever.
    fn run(&self, fd: &OwnedFd) {
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: read(2) into our buffer, within its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log_error!("OOM watcher stopped: read inotify: {err}");
                return;
            }
            let n = n as usize;
            let mut st = self.state();
            let mut off = 0;
            while off + header <= n {
                // SAFETY: the kernel wrote a whole inotify_event at `off`
                // (events are never split); read_unaligned copes with any
                // alignment.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                off += header + event.len as usize;
                if event.mask & libc::IN_Q_OVERFLOW != 0 {
                    let wds: Vec<i32> = st.watches.keys().copied().collect();
                    for wd in wds {
                        self.check(&mut st, wd);
                    }
                } else if event.mask & libc::IN_IGNORED != 0 {
                    st.watches.remove(&event.wd);
                } else {
                    self.check(&mut st, event.wd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn events(path: &Path, kills: u64) {
        std::fs::write(
            path,
            format!("low 0\nhigh 0\nmax 3\noom 1\noom_kill {kills}\noom_group_kill 0\n"),
        )
        .unwrap();
    }

    /// Waits at most `timeout` (a timer thread stands in for the closing
    /// connection).
    fn wait_for(w: &Arc<OomWatcher>, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let waker = Arc::clone(w);
        let timer = thread::spawn(move || {
            thread::sleep(timeout);
            waker.wake_all();
        });
        let got = w.wait(|| Instant::now() < deadline);
        if got.is_none() {
            timer.join().unwrap();
        }
        got
    }

    #[test]
    fn queues_each_new_kill_per_container() {
        let dir = std::env::temp_dir().join(format!("arrow-oom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.events"), dir.join("b.events"));
        events(&a, 5);
        events(&b, 0);
        let w = OomWatcher::new();
        w.watch("a", &a).unwrap();
        w.watch("b", &b).unwrap();

        // Kills before the watch are not news.
        assert_eq!(wait_for(&w, Duration::from_millis(100)), None);

        events(&b, 1);
        assert_eq!(wait_for(&w, Duration::from_secs(5)).as_deref(), Some("b"));
        events(&a, 7);
        assert_eq!(wait_for(&w, Duration::from_secs(5)).as_deref(), Some("a"));
        assert_eq!(wait_for(&w, Duration::from_secs(5)).as_deref(), Some("a"));
        assert_eq!(wait_for(&w, Duration::from_millis(100)), None);

        // An answer that could not be sent comes back first.
        events(&b, 2);
        let got = wait_for(&w, Duration::from_secs(5)).unwrap();
        w.requeue(got);
        assert_eq!(wait_for(&w, Duration::from_secs(5)).as_deref(), Some("b"));

        // A kill recorded just before unwatching is still reported, and
        // nothing after.
        {
            // Simulate a notification that has not arrived yet.
            let mut st = w.state();
            for watch in st.watches.values_mut() {
                if watch.container == "a" {
                    watch.seen = 6;
                }
            }
        }
        w.unwatch("a");
        assert_eq!(wait_for(&w, Duration::from_secs(1)).as_deref(), Some("a"));
        events(&a, 9);
        assert_eq!(wait_for(&w, Duration::from_millis(200)), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_file_cannot_be_watched() {
        let w = OomWatcher::new();
        assert!(w
            .watch("x", Path::new("/nonexistent/memory.events"))
            .is_err());
        assert!(w.state().watches.is_empty());
    }
}
