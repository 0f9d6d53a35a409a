//! The runtime state directory:
//!
//! ```text
//! <state>/
//!   events.sock                    ttrpc Events service the shims publish to
//!   pods/<pod id>/
//!     pod.json                     the pod (atomic rewrite)
//!     cni.json                     the CNI ADD result, for DEL after a restart
//!     hostname hosts resolv.conf   files the pod's containers bind
//!     shm/                         the /dev/shm source (the guest mounts a tmpfs)
//!     bundle/                      the sandbox's OCI bundle (config.json, rootfs/, log)
//!   containers/<container id>/
//!     container.json               the container (atomic rewrite)
//!     bundle/                      its OCI bundle
//!     stdout stderr                FIFOs the shim writes the container's output to
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::{Container, Pod};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<StateDir> {
        for dir in ["pods", "containers"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|e| io_error("creating", &path, e))?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn events_socket(&self) -> PathBuf {
        self.root.join("events.sock")
    }

    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.root.join("pods").join(id)
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    pub fn save_pod(&self, pod: &Pod) -> Result<()> {
        write_json(&self.pod_dir(&pod.id).join("pod.json"), pod)
    }

    pub fn save_container(&self, c: &Container) -> Result<()> {
        write_json(&self.container_dir(&c.id).join("container.json"), c)
    }

    /// Every pod and container on disk. A record that cannot be read is
    /// logged and skipped: one damaged file must not stop the node.
    pub fn load(&self) -> (Vec<Pod>, Vec<Container>) {
        let pods = load_all(&self.root.join("pods"), "pod.json");
        let containers = load_all(&self.root.join("containers"), "container.json");
        (pods, containers)
    }

    pub fn remove_pod(&self, id: &str) -> Result<()> {
        remove_dir(&self.pod_dir(id))
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        remove_dir(&self.container_dir(id))
    }
}

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), path, &e)
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("removing", path, e)),
    }
}

/// Writes `value` to `path` through a temporary file and a rename, so a
/// crash leaves the old record or the new one, never half of one.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let data = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &data)
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| io_error("writing", path, e))
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let data = fs::read(path).map_err(|e| io_error("reading", path, e))?;
    serde_json::from_slice(&data)
        .map_err(|e| Error::Internal(format!("{} is not valid: {e}", path.display())))
}

fn load_all<T: DeserializeOwned>(dir: &Path, file: &str) -> Vec<T> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path().join(file);
        if !path.exists() {
            // A directory whose record was never written: a create that
            // crashed half way. Its owner finds nothing to manage.
            tracing::warn!(dir = %entry.path().display(), "no {file}: skipped");
            continue;
        }
        match read_json(&path) {
            Ok(v) => out.push(v),
            Err(e) => tracing::error!("{e}: skipped"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::*;
    use super::*;

    fn pod(id: &str) -> Pod {
        Pod {
            id: id.into(),
            spec: PodSpec {
                name: "p".into(),
                ..Default::default()
            },
            state: PodState::Ready,
            created_at: 5,
            netns: Some("/run/netns/x".into()),
            ip: Some("10.99.0.2".into()),
            additional_ips: vec![],
            shim_address: "unix:///x".into(),
            sandbox_pid: 9,
            stopped: false,
        }
    }

    #[test]
    fn records_round_trip_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save_pod(&pod("a")).unwrap();
        state.save_pod(&pod("b")).unwrap();
        let c = Container {
            id: "c".into(),
            pod_id: "a".into(),
            spec: ContainerSpec::default(),
            image_id: "sha256:1".into(),
            image_ref: "x".into(),
            state: ContainerState::Exited,
            created_at: 1,
            started_at: 2,
            exit: Some(ExitRecord {
                code: 3,
                at: 4,
                oom_killed: false,
            }),
            oom_seen: false,
            log_file: "/l".into(),
        };
        state.save_container(&c).unwrap();
        fs::write(state.pod_dir("b").join("pod.json"), b"{").unwrap();
        fs::create_dir_all(state.pod_dir("half")).unwrap();
        let (pods, containers) = state.load();
        assert_eq!(pods, vec![pod("a")]);
        assert_eq!(containers, vec![c]);
        state.remove_pod("a").unwrap();
        state.remove_pod("a").unwrap();
        assert!(!state.pod_dir("a").exists());
    }
}
