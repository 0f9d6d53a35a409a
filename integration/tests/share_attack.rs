//! The VM boundary at the pod's share: a hostile guest tries to redirect
//! the shim's root-owned mounts by planting symlinks, renaming directories
//! and swapping files at every path the shim touches, while pods with
//! volumes start and stop under containerd's CRI (handler `arrow`).
//!
//! Two attackers play the guest:
//! - on the host, a tight loop on the very directory `arrow-vmm` exports
//!   (`/run/arrow/k8s.io/<pod>/shared`), which is what a guest can reach over
//!   virtio-fs, at full host speed (the race a fast guest would win);
//! - inside a real VM, a container with `CAP_SYS_ADMIN` that mounts the
//!   pod's virtio-fs share itself (`mount -t virtiofs arrow`), as a guest
//!   kernel or a privileged container can, and plants the same things over
//!   virtio-fs.
//!
//! Afterwards a canary tree outside the share is byte-for-byte unchanged,
//! no mount was made outside a pod's directory, no plant succeeded, and
//! every pod started and read its volumes correctly. Needs root and KVM.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE};
use integration::cri::{container_config, log_text, read_cri_log, unique_name};
use k8s_cri::v1 as cri;

const STATE: &str = "/run/arrow/k8s.io";
/// Pods started and stopped while the attackers run.
const POD_CYCLES: usize = 3;
/// Containers (each with two volumes) per pod.
const CONTAINERS_PER_POD: usize = 2;

/// Everything about a tree that an attacker could change: paths, types,
/// modes, owners, link targets and contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else {
                format!("file {:?}", fs::read(&path).unwrap())
            };
            let key = path.strip_prefix(root).unwrap().to_path_buf();
            out.insert(
                key,
                format!("{what} mode {:o} uid {}", meta.mode(), meta.uid()),
            );
        }
    }
    out
}

fn canary_tree(root: &Path) {
    fs::create_dir_all(root.join("cron.d")).unwrap();
    fs::write(root.join("cron.d/keep"), "keep me\n").unwrap();
    fs::create_dir_all(root.join("etc/sub")).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/sub/0"), "zero\n").unwrap();
}

/// Mount points (field 5 of mountinfo) this process sees.
fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn is_mounted(path: &Path) -> bool {
    let path = path.to_string_lossy();
    mount_points().iter().any(|m| *m == path)
}

/// One round of the host-side attacker over every pod's exported share:
/// every operation must fail (read-only); returns how many were tried.
///
/// The attacker works through a descriptor of the exported view taken while
/// it is mounted (as the VMM's own descriptors are), through
/// `/proc/self/fd/N`: that stays on the view's mount even once the shim
/// detaches it, so the attacker never writes into the pod's plain state
/// directory, which no guest can reach (before the view is mounted no VM
/// exists; after it is unmounted the VM is gone).
fn plant_once(canary: &Path, succeeded: &AtomicUsize) -> usize {
    let mut tried = 0;
    let Ok(pods) = fs::read_dir(STATE) else {
        return 0;
    };
    for pod in pods.flatten() {
        let view = pod.path().join("shared");
        if !is_mounted(&view) {
            continue;
        }
        let Ok(handle) = fs::File::open(&view) else {
            continue;
        };
        // Mounted before and after the open: the descriptor is the view's
        // (a pod's view is mounted once in its life).
        if !is_mounted(&view) {
            continue;
        }
        let share = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        let Ok(entries) = fs::read_dir(&share) else {
            continue;
        };
        let mut attempts: Vec<Box<dyn Fn() -> std::io::Result<()>>> = Vec::new();
        let share2 = share.clone();
        let canary2 = canary.to_path_buf();
        attempts.push(Box::new(move || {
            symlink(&canary2, share2.join("planted-container"))
        }));
        let share2 = share.clone();
        attempts.push(Box::new(move || {
            fs::write(share2.join("filler"), [0u8; 4096])
        }));
        for entry in entries.flatten() {
            let dir = entry.path();
            let c = canary.to_path_buf();
            let d = dir.clone();
            attempts.push(Box::new(move || {
                fs::rename(d.join("mounts"), d.join("mounts.old"))?;
                symlink(c.join("cron.d"), d.join("mounts"))
            }));
            let d = dir.clone();
            let c = canary.to_path_buf();
            attempts.push(Box::new(move || symlink(c.join("etc"), d.join("mounts/9"))));
            let d = dir.clone();
            attempts.push(Box::new(move || fs::remove_dir(d.join("rootfs"))));
            let d = dir.clone();
            attempts.push(Box::new(move || {
                fs::rename(&d, d.with_extension("moved"))?;
                fs::rename(d.with_extension("moved"), &d)
            }));
            let d = dir.clone();
            attempts.push(Box::new(move || fs::write(d.join("mounts/0.swap"), "x")));
        }
        let mut planted = 0;
        for attempt in attempts {
            tried += 1;
            if attempt().is_ok() {
                planted += 1;
            }
        }
        drop(handle);
        if planted > 0 {
            eprintln!("planted {planted} in {}", view.display());
            succeeded.fetch_add(planted, Ordering::Relaxed);
        }
    }
    tried
}

/// The guest-side attacker: mounts the pod's share over virtio-fs and
/// plants symlinks, renames and files at every container directory,
/// counting what the host refused; prints `planted N refused M`.
const GUEST_ATTACK: &str = r#"
mkdir -p /attack && mount -t virtiofs arrow /attack || { echo "mount failed"; exit 1; }
echo mounted
refused=0; planted=0
end=$(( $(date +%s) + 40 ))
while [ $(date +%s) -lt $end ]; do
  for d in /attack/*/; do
    [ -d "$d" ] || continue
    if ln -s /etc "${d}mounts/9" 2>/dev/null; then planted=$((planted+1)); else refused=$((refused+1)); fi
    if mv "${d}mounts" "${d}old" 2>/dev/null; then planted=$((planted+1)); else refused=$((refused+1)); fi
    if echo x 2>/dev/null > "${d}swap"; then planted=$((planted+1)); else refused=$((refused+1)); fi
  done
  if ln -s /etc /attack/planted 2>/dev/null; then planted=$((planted+1)); else refused=$((refused+1)); fi
done
echo "planted $planted refused $refused"
ls /attack/*/mounts > /dev/null 2>&1
sleep 600
"#;

#[test]
fn a_hostile_guest_cannot_redirect_the_shims_mounts() {
    if skip_unless_root("a_hostile_guest_cannot_redirect_the_shims_mounts") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(attack());
}

async fn attack() {
    let containerd = Containerd::shared();
    let cri = containerd.cri().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary");
    canary_tree(&canary);
    let before = snapshot(&canary);
    let mounts_before = mount_points();

    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let host_attacker = {
        let (stop, succeeded, canary) = (stop.clone(), succeeded.clone(), canary.clone());
        std::thread::spawn(move || {
            let mut tried = 0;
            while !stop.load(Ordering::Relaxed) {
                tried += plant_once(&canary, &succeeded);
            }
            tried
        })
    };

    let mut guest_reports = Vec::new();
    for cycle in 0..POD_CYCLES {
        let pod = cri
            .run_pod_sandbox(&unique_name("attack"), "arrow")
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", containerd.log_tail(30)));
        // The guest-side attacker, in the first pod.
        let attacker = if cycle == 0 {
            let mut config = container_config(
                "attacker",
                BUSYBOX_IMAGE,
                &["sh", "-c", GUEST_ATTACK],
                "a.log",
            );
            let linux = config.linux.get_or_insert_with(Default::default);
            let security = linux.security_context.get_or_insert_with(Default::default);
            security.capabilities = Some(cri::Capability {
                add_capabilities: vec!["SYS_ADMIN".into()],
                ..Default::default()
            });
            let id = cri.create_container_with(&pod, config).await.unwrap();
            cri.start_container(&id).await.unwrap();
            Some(id)
        } else {
            None
        };
        let mut ids = Vec::new();
        for n in 0..CONTAINERS_PER_POD {
            let volume = work.path().join(format!("vol-{cycle}-{n}"));
            fs::create_dir_all(&volume).unwrap();
            fs::write(volume.join("data"), format!("volume {cycle}-{n}\n")).unwrap();
            let file = work.path().join(format!("file-{cycle}-{n}"));
            fs::write(&file, format!("file {cycle}-{n}\n")).unwrap();
            let log = format!("c{n}.log");
            let mut config = container_config(
                &format!("c{n}"),
                BUSYBOX_IMAGE,
                &["sh", "-c", "cat /data/data /file; echo written > /data/out"],
                &log,
            );
            config.mounts.push(cri::Mount {
                container_path: "/data".into(),
                host_path: volume.display().to_string(),
                ..Default::default()
            });
            config.mounts.push(cri::Mount {
                container_path: "/file".into(),
                host_path: file.display().to_string(),
                readonly: true,
                ..Default::default()
            });
            let id = cri.create_container_with(&pod, config).await.unwrap();
            cri.start_container(&id).await.unwrap();
            ids.push((id, volume, log, cycle, n));
        }
        for (id, volume, log, cycle, n) in &ids {
            let code = cri
                .wait_container_exit(id, Duration::from_secs(180))
                .await
                .unwrap();
            assert_eq!(code, 0, "container {id}");
            let lines = read_cri_log(pod.log_file(log)).unwrap();
            assert_eq!(
                log_text(&lines, Some("stdout")),
                format!("volume {cycle}-{n}\nfile {cycle}-{n}\n"),
                "{lines:?}"
            );
            assert_eq!(fs::read_to_string(volume.join("out")).unwrap(), "written\n");
            cri.remove_container(id).await.unwrap();
        }
        if let Some(attacker) = attacker {
            let log = pod.log_file("a.log");
            let text = integration::cri::wait_for_log(&log, "planted", Duration::from_secs(300))
                .await
                .unwrap_or_else(|e| panic!("guest attacker: {e:#}"));
            guest_reports.push(text);
            cri.stop_container(&attacker, 0).await.unwrap();
            cri.remove_container(&attacker).await.unwrap();
        }
        cri.remove_pod(&pod).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let host_tries = host_attacker.join().unwrap();

    let guest = guest_reports.join("\n");
    eprintln!("host attacker: {host_tries} tries; guest attacker: {guest}");
    assert!(
        guest.contains("mounted"),
        "the guest mounted its share: {guest}"
    );
    let line = guest
        .lines()
        .find(|l| l.contains("planted "))
        .unwrap_or_default()
        .to_string();
    let counts: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "guest report {line:?}");
    assert_eq!(counts[0], 0, "the guest planted something: {line}");
    assert!(counts[1] > 0, "the guest tried: {line}");
    assert!(
        host_tries >= 300,
        "host attacker tried only {host_tries} times"
    );
    assert_eq!(
        succeeded.load(Ordering::Relaxed),
        0,
        "a host-side plant succeeded"
    );
    assert_eq!(snapshot(&canary), before, "the canary tree changed");
    let new_mounts: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| !mounts_before.contains(m))
        .collect();
    assert!(
        new_mounts.is_empty(),
        "mounts left or made: {new_mounts:#?}"
    );
}
