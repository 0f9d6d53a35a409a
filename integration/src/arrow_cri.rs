//! `arrow-cri` without containerd, for its end-to-end tests and benchmark:
//! the built daemon on its own socket, root, state and CNI directories (a
//! bridge network of its own), and Debian's `docker-registry` on loopback
//! holding the test busybox image for it to pull.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The bridge of arrow-cri's CNI network and its subnet.
pub const BRIDGE: &str = "arrowcri0";
pub const SUBNET: &str = "10.99.0.0/16";
/// The bridge's own address (the pods' gateway).
pub const GATEWAY: &str = "10.99.0.1";

/// Where `hack/build.sh` put the binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("ARROW_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/arrow"))
}

fn built(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} missing: run hack/build.sh (hack/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// Debian's `docker-registry` on a loopback port, its storage in a
/// temporary directory; stopped when dropped.
pub struct Registry {
    _dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        let bin = "/usr/bin/docker-registry";
        if !Path::new(bin).exists() {
            bail!("{bin} missing: hack/deps.sh installs it");
        }
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        fs::write(dir.path().join("config.yml"), config)?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let mut registry = Registry {
            _dir: dir,
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = registry.child.kill();
                bail!("docker-registry did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// Pushes the test busybox tree as `arrow/busybox:e2e`; returns the
    /// reference.
    pub async fn push_busybox(&self) -> Result<String> {
        use flate2::write::GzEncoder;
        use oci_client::client::{ClientConfig, ClientProtocol};
        use oci_client::{secrets::RegistryAuth, Client, Reference};
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sha = |d: &[u8]| format!("sha256:{:x}", Sha256::digest(d));
        let layer = arrow_image::layer_tar(&crate::busybox_rootfs())?;
        let diff_id = sha(&layer);
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer)?;
        let layer_gz = gz.finish()?;
        let mut settings = arrow_image::ImageSettings::new("arrow/busybox:e2e");
        settings.cmd = vec!["sh".into()];
        let config = serde_json::to_vec(&arrow_image::image_config(&settings, &diff_id))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": arrow_image::MEDIA_MANIFEST,
            "config": {"mediaType": arrow_image::MEDIA_CONFIG, "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": arrow_image::MEDIA_LAYER_GZIP, "digest": sha(&layer_gz), "size": layer_gz.len()}],
        }))?;
        let host = format!("127.0.0.1:{}", self.port);
        let reference = Reference::with_tag(host.clone(), "arrow/busybox".into(), "e2e".into());
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        client
            .auth(
                &reference,
                &RegistryAuth::Anonymous,
                oci_client::RegistryOperation::Push,
            )
            .await?;
        for data in [&config, &layer_gz] {
            client
                .push_blob(&reference, data.clone(), &sha(data))
                .await?;
        }
        client
            .push_manifest_raw(&reference, manifest, arrow_image::MEDIA_MANIFEST.parse()?)
            .await?;
        Ok(format!("{host}/arrow/busybox:e2e"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The built `arrow-cri` with everything under one directory: its socket,
/// root, state, log (`arrow-cri.log`), a CNI config (a bridge on
/// [`SUBNET`] with portmap, IPAM state of its own). SIGTERM when dropped.
pub struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("cri.sock")
    }

    pub fn start(dir: &Path) -> Result<Daemon> {
        // An empty config file: only the flags below, never /etc/arrow-cri.
        fs::write(dir.join("none.toml"), "")?;
        let conf = dir.join("net.d");
        fs::create_dir_all(&conf)?;
        fs::write(
            conf.join("10-arrow-cri-e2e.conflist"),
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "arrow-cri-e2e", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{SUBNET}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}],
             "dataDir": "{}"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#,
                dir.join("ipam").display()
            ),
        )?;
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            child: None,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts the daemon (again, after [`Daemon::kill9`]) and waits for its
    /// socket.
    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("arrow-cri.log"))?;
        let child = Command::new(built("arrow-cri")?)
            .arg("--config")
            .arg(self.dir.join("none.toml"))
            .arg("--listen")
            .arg(self.socket())
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--state")
            .arg(self.dir.join("state"))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("net.d"))
            .arg("--cni-bin-dir")
            .arg("/usr/lib/cni")
            .arg("--shim")
            .arg(built("containerd-shim-arrow-v1")?)
            .arg("--log-level")
            .arg("info")
            .env("ARROW_KERNEL", crate::kernel())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting arrow-cri")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if Instant::now() > deadline {
                bail!("arrow-cri did not start:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The daemon's resident memory (kB).
    pub fn rss_kb(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("arrow-cri.log")).unwrap_or_default()
    }

    /// The pod shims this daemon started (their containerd address is its
    /// socket): a shim outlives its daemon by design, as under containerd.
    fn shims(&self) -> Vec<nix::unistd::Pid> {
        let socket = self.socket().into_os_string().into_encoded_bytes();
        let Ok(procs) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                args.first()
                    .is_some_and(|a| a.ends_with(b"containerd-shim-arrow-v1"))
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"-address" && w[1] == socket)
            })
            .map(nix::unistd::Pid::from_raw)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that failed half-way leaves pods; their shims (and, through
        // the lifeline, their VMMs) go with the daemon rather than run on
        // beside the next tests.
        if std::thread::panicking() {
            for shim in self.shims() {
                let _ = nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_daemons_shims_are_those_given_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon {
            dir: dir.path().to_path_buf(),
            child: None,
        };
        let other = dir.path().join("other.sock");
        let spawn = |address: &Path| {
            // The shell waits in a builtin on its stdin: no child of its
            // own to outlive the kill below.
            Command::new("sh")
                .arg0("/usr/local/bin/containerd-shim-arrow-v1")
                .args(["-c", "read -r _", "-namespace", "-address"])
                .arg(address)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(&daemon.socket());
        let mut theirs = spawn(&other);
        let found = daemon.shims();
        assert_eq!(found, vec![nix::unistd::Pid::from_raw(ours.id() as i32)]);
        for c in [&mut ours, &mut theirs] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
