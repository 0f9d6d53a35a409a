//! The private containerd of `hack/containerd.sh` as a test fixture: started
//! once (and left running for the next test binary or benchmark; stop it
//! with `hack/containerd.sh stop`), the test images of `hack/images.sh`
//! imported, `ctr` and a CRI client at hand.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE};
//! if skip_unless_root("my_test") { return Ok(()); }
//! let containerd = Containerd::shared();
//! let out = containerd.ctr(&["run", "--rm", BUSYBOX_IMAGE, "t1", "echo", "hello"]);
//! let cri = containerd.cri().await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cri::CriClient;
use crate::workspace_root;

/// The socket of the private containerd.
pub const ADDRESS: &str = "/run/arrow-test/containerd/containerd.sock";
/// Its log.
pub const LOG: &str = "/run/arrow-test/containerd.log";
/// The namespace the CRI plugin uses, where the images are imported.
pub const NAMESPACE: &str = "k8s.io";
/// `sh` by default; every busybox applet in /bin.
pub const BUSYBOX_IMAGE: &str = "localhost/arrow/busybox:latest";
/// The sandbox image: the static arrow-pause as /pause.
pub const PAUSE_IMAGE: &str = "localhost/arrow/pause:latest";
/// The busybox image plus iptables (legacy and nft), nft and iproute2's ip.
pub const NETTOOLS_IMAGE: &str = "localhost/arrow/nettools:latest";

/// The pods' CNI subnet in `hack/containerd.sh` when `ARROW_TEST_SUBNET`
/// does not name another: not containerd's stock `10.88.0.0/16`, so the
/// tests run beside a containerd with its default bridge.
pub const DEFAULT_POD_SUBNET: &str = "10.213.0.0/16";

/// Whether `ip` is in the pods' subnet (`ARROW_TEST_SUBNET` or
/// [`DEFAULT_POD_SUBNET`]).
pub fn in_pod_subnet(ip: &str) -> bool {
    let subnet = std::env::var("ARROW_TEST_SUBNET").unwrap_or_else(|_| DEFAULT_POD_SUBNET.into());
    let Some((net, len)) = subnet.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len), Ok(ip)) = (
        net.parse::<std::net::Ipv4Addr>(),
        len.parse::<u32>(),
        ip.parse::<std::net::Ipv4Addr>(),
    ) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// What a `ctr` run gave.
#[derive(Debug)]
pub struct CtrOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtrOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout if `ctr` succeeded, else an error with both streams.
    pub fn check(self) -> Result<String> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            bail!(
                "ctr failed ({}): {}{}",
                self.status,
                self.stdout,
                self.stderr
            )
        }
    }
}

/// Whether this process is root, which the containerd tests need. When it
/// is not, prints why `test` is skipped and returns true.
pub fn skip_unless_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipping {test}: needs root (it runs a private containerd)");
    true
}

/// Serialises tests that need the shared containerd to themselves (a
/// benchmark, a test that restarts it). Tests that only add their own pods
/// and containers need not take it.
pub fn containerd_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn hack(script: &str) -> PathBuf {
    workspace_root().join("hack").join(script)
}

fn run_script(cmd: &mut Command) -> Result<String> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The private containerd (see `hack/containerd.sh`).
#[derive(Debug)]
pub struct Containerd {
    address: PathBuf,
    namespace: String,
    /// How long `start` took, if this process started it.
    started_in: Option<Duration>,
}

impl Containerd {
    /// The one containerd of this process's tests, started (if it does not
    /// run yet) and given the test images on first use. Panics with the
    /// reason if it cannot be had: check [`skip_unless_root`] first.
    pub fn shared() -> &'static Containerd {
        static SHARED: OnceLock<Containerd> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(c) = SHARED.get() {
            return c;
        }
        let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
        SHARED.get_or_init(|| {
            let c = Containerd::start().unwrap_or_else(|e| panic!("{e:#}"));
            c.import_images().unwrap_or_else(|e| panic!("{e:#}"));
            c
        })
    }

    /// Starts the private containerd with `hack/containerd.sh start`, or
    /// attaches to it if it runs.
    pub fn start() -> Result<Containerd> {
        let running = Command::new(hack("containerd.sh"))
            .arg("status")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let mut started_in = None;
        if !running {
            let t0 = Instant::now();
            run_script(Command::new(hack("containerd.sh")).arg("start"))?;
            started_in = Some(t0.elapsed());
        }
        Ok(Containerd {
            address: PathBuf::from(ADDRESS),
            namespace: NAMESPACE.to_string(),
            started_in,
        })
    }

    /// Stops it with `hack/containerd.sh stop` (every task and container it
    /// holds goes too).
    pub fn stop(&self) -> Result<()> {
        run_script(Command::new(hack("containerd.sh")).arg("stop")).map(drop)
    }

    /// Builds (cached) and imports the test images into [`Self::namespace`].
    pub fn import_images(&self) -> Result<()> {
        self.import_images_into(&self.namespace)
    }

    /// Builds (cached) and imports the test images into `namespace`.
    pub fn import_images_into(&self, namespace: &str) -> Result<()> {
        run_script(
            Command::new(hack("images.sh"))
                .arg("import")
                .arg(&self.address)
                .arg(namespace),
        )
        .map(drop)
    }

    /// Imports an image tarball (e.g. one from [`crate::image`]).
    pub fn import_archive(&self, tarball: &Path) -> Result<()> {
        let path = tarball.to_string_lossy();
        self.ctr(&["images", "import", &path]).check().map(drop)
    }

    /// Whether the namespace holds image `name`.
    pub fn has_image(&self, name: &str) -> bool {
        self.ctr(&["images", "ls", "-q", &format!("name=={name}")])
            .check()
            .is_ok_and(|out| out.lines().any(|l| l == name))
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// How long `hack/containerd.sh start` took, if this process started it.
    pub fn started_in(&self) -> Option<Duration> {
        self.started_in
    }

    /// The end of containerd's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(LOG).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `ctr --address ADDRESS -n NAMESPACE ARGS…`.
    pub fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctr_in(&self.namespace, args)
    }

    /// `ctr` in another namespace.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> CtrOutput {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .arg("-n")
            .arg(namespace)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running ctr: {e} (is containerd installed? hack/deps.sh)"));
        CtrOutput {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A CRI client on its socket, once the CRI plugin reports ready.
    pub async fn cri(&self) -> Result<CriClient> {
        let client = CriClient::connect(&self.address).await?;
        client.wait_ready(Duration::from_secs(30)).await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_subnet_membership() {
        if std::env::var_os("ARROW_TEST_SUBNET").is_some() {
            return;
        }
        assert!(in_pod_subnet("10.213.0.5"));
        assert!(in_pod_subnet("10.213.255.254"));
        assert!(!in_pod_subnet("10.88.0.5"));
        assert!(!in_pod_subnet("not an address"));
    }
}
