//! The pod sandbox process of `localhost/arrow/pause`, doing what Kubernetes'
//! `pause` does: sleep until SIGINT or SIGTERM, then exit 0; reap any child
//! that the pod's PID namespace hands it on SIGCHLD. Built static
//! (hack/images.sh) because the image holds nothing else.
//!
//! The three signals are blocked and taken with `sigwait`: blocked signals
//! are queued even for a PID-namespace init, which the kernel would otherwise
//! spare from signals it has no handler for.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("arrow-pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if getpid().as_raw() != 1 {
        eprintln!("Warning: pause should be the first process");
    }
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGCHLD);
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("arrow-pause: sigprocmask: {e}");
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(signal) => {
                eprintln!("Shutting down, got signal: {signal}");
                std::process::exit(0);
            }
            Err(e) => eprintln!("arrow-pause: sigwait: {e}"),
        }
    }
}

/// Reaps every child that has exited.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
