//! Pull benchmark (not a timed test; `#[ignore]`d, run by
//! hack/bench-pull.sh): pull + unpack of a multi-layer image of about 50 MB
//! (compressed; built from files of this machine's /usr) from Debian's
//! docker-registry on loopback, arrow-cri (PullImage over CRI) against
//! Debian's containerd (`ctr images pull --plain-http`, a private containerd
//! with its own root, state and socket), alternating, median of 5; then the
//! disk used by each store for two images sharing all layers but one.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A gzip layer of files under `dir` (sorted walk, symbolic links kept),
/// until `budget` bytes of content.
fn layer_from(dir: &str, budget: u64) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut total = 0u64;
    let mut stack = vec![PathBuf::from(dir)];
    'walk: while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = match std::fs::read_dir(&d) {
            Ok(r) => r.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => continue,
        };
        entries.sort();
        entries.reverse();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix("/").unwrap();
            if m.is_dir() {
                b.append_dir(rel, &p).unwrap();
                stack.push(p);
            } else if m.is_file() || m.file_type().is_symlink() {
                if m.is_file() && std::fs::File::open(&p).is_err() {
                    continue;
                }
                b.append_path_with_name(&p, rel).unwrap();
                total += m.len();
                if total >= budget {
                    break 'walk;
                }
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha256(&tar);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&tar).unwrap();
    let blob = enc.finish().unwrap();
    Layer {
        digest: sha256(&blob),
        blob,
        diff_id,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
    }
}

struct Containerd {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("arrow-bench-containerd")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{state}/debug.sock"
[metrics]
  address = ""
# Every run pulls into a namespace of its own: "isolated" makes each one
# download again instead of reusing another namespace's blobs.
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display()
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (hack/deps.sh installs it)");
        let c = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c
            .ctr(&["version"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) with integer arguments, on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // Snapshots are overlay-mounted only while containers run: none here.
    }
}

fn du(path: &Path) -> (u64, u64) {
    cri_server::unpack::disk_usage(path).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn sync_disks() {
    let _ = Command::new("sync").status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: hack/bench-pull.sh"]
async fn bench_pull() {
    require_root();
    let runs: usize = std::env::var("ARROW_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let reg = Registry::start(None);
    eprintln!("building layers from /usr ...");
    let l1 = layer_from("/usr/lib/x86_64-linux-gnu", 70 << 20);
    let l2 = layer_from("/usr/bin", 35 << 20);
    let l3 = layer_from("/usr/share/locale", 15 << 20);
    let l4 = layer_from("/usr/share/doc", 10 << 20);
    let l5 = layer_from("/usr/libexec", 10 << 20);
    let a = image(&[&l1, &l2, &l3, &l4], "", "amd64");
    let b = image(&[&l1, &l2, &l3, &l5], "", "amd64");
    reg.push("bench/a", "1", &a).await;
    reg.push("bench/b", "1", &b).await;
    let compressed: usize = [&l1, &l2, &l3, &l4].iter().map(|l| l.blob.len()).sum();
    let a_ref = format!("{}/bench/a:1", reg.host());
    let b_ref = format!("{}/bench/b:1", reg.host());
    println!(
        "image {a_ref}: 4 gzip layers, {:.1} MB compressed",
        compressed as f64 / 1e6
    );

    let containerd = Containerd::start();
    let mut arrow_times = Vec::new();
    let mut ctr_times = Vec::new();
    for run in 0..runs {
        // arrow-cri: a fresh store each run (the daemon's start not timed).
        let dir = tempfile::Builder::new()
            .prefix("arrow-bench-cri")
            .tempdir_in("/var/tmp")
            .unwrap();
        let daemon = Daemon::start(dir.path());
        let mut c = daemon.images().await;
        sync_disks();
        let t = Instant::now();
        pull(&mut c, &a_ref, None).await.unwrap();
        arrow_times.push(t.elapsed().as_secs_f64());
        drop(c);
        drop(daemon);
        // containerd: a fresh namespace each run (content and snapshots
        // are per namespace: a full fetch and unpack).
        sync_disks();
        let ns = format!("bench{run}");
        let t = Instant::now();
        let ok = containerd
            .ctr(&["-n", &ns, "images", "pull", "--plain-http", &a_ref])
            .status()
            .unwrap()
            .success();
        ctr_times.push(t.elapsed().as_secs_f64());
        assert!(ok, "ctr images pull failed");
        println!(
            "run {}: arrow-cri {:.3} s, containerd {:.3} s",
            run + 1,
            arrow_times[run],
            ctr_times[run]
        );
    }
    println!();
    println!("pull + unpack, median of {runs}   arrow-cri   containerd 1.6 (ctr)");
    println!(
        "{:<32} {:>8.3} s   {:>8.3} s",
        format!("{:.0} MB, 4 layers", compressed as f64 / 1e6),
        median(arrow_times),
        median(ctr_times)
    );

    // Disk for two images sharing three of four layers.
    let dir = tempfile::Builder::new()
        .prefix("arrow-bench-cri")
        .tempdir_in("/var/tmp")
        .unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    pull(&mut c, &a_ref, None).await.unwrap();
    let (one, _) = du(&Daemon::root(dir.path()));
    pull(&mut c, &b_ref, None).await.unwrap();
    let (two, inodes) = du(&Daemon::root(dir.path()));
    drop(c);
    drop(daemon);
    // A fresh containerd: the runs above left blobs in the old one's
    // (namespace-isolated, but on-disk shared) content store.
    drop(containerd);
    let containerd = Containerd::start();
    let ns = "benchdisk";
    let before = du(&containerd.root()).0;
    assert!(containerd
        .ctr(&["-n", ns, "images", "pull", "--plain-http", &a_ref])
        .status()
        .unwrap()
        .success());
    let ctr_one = du(&containerd.root()).0 - before;
    assert!(containerd
        .ctr(&["-n", ns, "images", "pull", "--plain-http", &b_ref])
        .status()
        .unwrap()
        .success());
    let ctr_two = du(&containerd.root()).0 - before;
    println!();
    println!("disk used by the store          arrow-cri   containerd 1.6");
    println!(
        "{:<32} {:>7.1} MB  {:>7.1} MB",
        "image a",
        one as f64 / 1e6,
        ctr_one as f64 / 1e6
    );
    println!(
        "{:<32} {:>7.1} MB  {:>7.1} MB   (arrow-cri: {inodes} inodes)",
        "a + b (3 of 4 layers shared)",
        two as f64 / 1e6,
        ctr_two as f64 / 1e6
    );
}
