//! The template cache: booted-and-snapshotted VMs that later VMs are cloned
//! from instead of booting. A template is keyed by everything the guest
//! booted from, its shape and its devices, so a change to any of them makes
//! a new one; one that cannot be restored (stale format, other host,
//! corrupt) is removed and rebuilt, never used.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::cancel::{Cancel, Interrupted};
use crate::snapshot::{FORMAT_VERSION, MEMORY_FILE, VMSTATE_FILE};
use crate::vm::{RestoreConfig, Vm, VmError};

/// Why the cache could not be used. A template that merely cannot be
/// restored is not an error: [`TemplateCache::clone_vm`] removes it.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Someone else could write the cache: nothing in it is used.
    #[error("template cache {}: {why}", root.display())]
    UntrustedCache { root: PathBuf, why: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// The wait for another creator's lock was cancelled.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
    /// Not the template's fault (the socket path is taken, the shared
    /// directory is missing, no KVM): it is left alone.
    #[error("cloning template {}: {source}", dir.display())]
    Clone {
        dir: PathBuf,
        #[source]
        source: VmError,
    },
    #[error("snapshotting the template VM: {0}")]
    Snapshot(#[source] VmError),
}

/// What [`TemplateCache::clone_vm`] found.
pub enum CloneOutcome {
    /// A clone of the template, ready to run.
    Cloned(Box<Vm>),
    /// There is no template with that key.
    Absent,
    /// There was one, unusable (stale format, other host, corrupt, not
    /// trusted): it was removed, to be rebuilt; the string says why.
    Removed(String),
}

/// The generation of what a booted guest settles with the VMM and keeps in
/// its memory: the virtio features and FUSE `INIT` flags it negotiated.
/// Neither is in a template's other inputs, so a VMM whose devices offer
/// something new bumps this, and its templates are made afresh instead of
/// cloning guests that never saw the offer (for example the page-cache
/// invalidation virtio-fs grants since generation 2).
const GUEST_SETTLEMENT: u32 = 2;

/// What a template is built from.
pub struct TemplateInputs<'a> {
    pub kernel: &'a [u8],
    pub initramfs: &'a [u8],
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub kernel_args: &'a [String],
    pub flavour: &'a str,
    /// The virtio devices, as `VmConfig::device_set` lists them.
    pub devices: &'a [String],
}

impl TemplateInputs<'_> {
    /// The cache key: a SHA-256 over every input, and the snapshot format.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(FORMAT_VERSION.to_le_bytes());
        h.update(GUEST_SETTLEMENT.to_le_bytes());
        for part in [self.kernel, self.initramfs, self.flavour.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update([self.vcpus]);
        h.update(self.memory_bytes.to_le_bytes());
        // Each list with its length, so no item can move between them.
        for list in [self.kernel_args, self.devices] {
            h.update((list.len() as u64).to_le_bytes());
            for item in list {
                h.update((item.len() as u64).to_le_bytes());
                h.update(item.as_bytes());
            }
        }
        h.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Templates under one directory, one subdirectory per key.
pub struct TemplateCache {
    root: PathBuf,
}

impl TemplateCache {
    /// The cache under `$ARROW_CACHE/templates`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the template with `key` lives.
    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A clone of the template with `key`, if there is a usable one; an
    /// unusable one is removed ([`CloneOutcome::Removed`]). Failures that
    /// are not the template's fault are errors and leave it alone.
    pub fn clone_vm(
        &self,
        key: &str,
        config: RestoreConfig,
    ) -> Result<CloneOutcome, TemplateError> {
        let dir = self.dir(key);
        if !dir.join(VMSTATE_FILE).is_file() {
            return Ok(CloneOutcome::Absent);
        }
        trusted(&self.root, true).map_err(|why| TemplateError::UntrustedCache {
            root: self.root.clone(),
            why,
        })?;
        let untrusted = trusted(&dir, true).err().or_else(|| {
            [VMSTATE_FILE, MEMORY_FILE]
                .iter()
                .find_map(|f| trusted(&dir.join(f), false).err())
        });
        if let Some(why) = untrusted {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(CloneOutcome::Removed(format!(
                "template {} is not trusted ({why}); removed, it will be rebuilt",
                dir.display()
            )));
        }
        match Vm::restore(&dir, config) {
            Ok(vm) => Ok(CloneOutcome::Cloned(Box::new(vm))),
            Err(e) if e.is_snapshot_fault() => {
                let _ = std::fs::remove_dir_all(&dir);
                Ok(CloneOutcome::Removed(format!(
                    "template {} is unusable ({e}); removed, it will be rebuilt",
                    dir.display()
                )))
            }
            Err(source) => Err(TemplateError::Clone { dir, source }),
        }
    }

    /// Creates the cache directory if missing. Modes are explicit: the
    /// process umask is cleared once a virtio-fs device is set up.
    pub fn create_root(&self) -> Result<(), TemplateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(|source| TemplateError::Io {
                what: "creating",
                path: self.root.clone(),
                source,
            })
    }

    /// Takes the lock for creating the template with `key` (an exclusive
    /// `flock` on `.<key>.lock` in the cache), waiting while another
    /// process holds it, until `cancel` is requested. The kernel drops the
    /// lock when its holder dies, so a crashed creator blocks nobody.
    pub fn lock(&self, key: &str, cancel: &Cancel) -> Result<TemplateLock, TemplateError> {
        self.create_root()?;
        let path = self.root.join(format!(".{key}.lock"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| TemplateError::Io {
                what: "opening",
                path: path.clone(),
                source,
            })?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(TemplateLock { _flock: flock }),
                Err((f, Errno::EWOULDBLOCK)) => {
                    file = f;
                    cancel.check()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, source)) => return Err(TemplateError::Lock { path, source }),
            }
        }
    }

    /// Snapshots the running `vm` as the template for `key` and lets it go
    /// on. Written to a private directory first and renamed into place, so a
    /// concurrent reader never sees half a template; if another process
    /// published one meanwhile, ours is dropped.
    pub fn publish(&self, key: &str, vm: &mut Vm) -> Result<PathBuf, TemplateError> {
        self.create_root()?;
        let tmp = self.root.join(format!(".{key}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = vm.snapshot(&tmp, true);
        let dir = self.dir(key);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(TemplateError::Snapshot(e));
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            // Lost a race with another creator: theirs is as good.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Ok(dir)
    }
}

/// Whether `path` may be trusted as (part of) a template: a real directory
/// (`dir`) or regular file, not a symlink, owned by this process's user
/// (root for the shim's VMMs) and writable by nobody else. Anyone else who
/// could write a template could run code in every clone.
fn trusted(path: &Path, dir: bool) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kind_ok = if dir { meta.is_dir() } else { meta.is_file() };
    if !kind_ok {
        return Err(format!(
            "{} is not a {}",
            path.display(),
            if dir { "directory" } else { "regular file" }
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(format!(
            "{} is owned by uid {}, not {euid}",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The creation lock of one template; released when dropped.
pub struct TemplateLock {
    _flock: Flock<File>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(kernel: &'a [u8], args: &'a [String]) -> TemplateInputs<'a> {
        TemplateInputs {
            kernel,
            initramfs: b"cpio",
            vcpus: 1,
            memory_bytes: 128 << 20,
            kernel_args: args,
            flavour: "kvm_pvm",
            devices: &[],
        }
    }

    fn outcome_name(o: &CloneOutcome) -> String {
        match o {
            CloneOutcome::Cloned(_) => "cloned".into(),
            CloneOutcome::Absent => "absent".into(),
            CloneOutcome::Removed(why) => format!("removed: {why}"),
        }
    }

    #[test]
    fn key_changes_with_every_input() {
        let args = vec!["quiet".to_owned()];
        let base = inputs(b"kernel", &args).key();
        assert_eq!(base.len(), 32);
        assert_eq!(base, inputs(b"kernel", &args).key());
        assert_ne!(base, inputs(b"kernel2", &args).key());
        let mut other = inputs(b"kernel", &args);
        other.vcpus = 2;
        assert_ne!(base, other.key());
        let mut other = inputs(b"kernel", &args);
        other.memory_bytes *= 2;
        assert_ne!(base, other.key());
        // A template made under kvm_pvm is never found under hardware KVM
        // (and the other way round): the flavour is part of the key.
        let mut other = inputs(b"kernel", &args);
        other.flavour = "hardware KVM (kvm_amd)";
        assert_ne!(base, other.key());
        let none: Vec<String> = vec![];
        assert_ne!(base, inputs(b"kernel", &none).key());
        let fs = vec!["virtio-fs tag=arrow".to_owned()];
        let mut other = inputs(b"kernel", &args);
        other.devices = &fs;
        assert_ne!(
            base,
            other.key(),
            "templates with and without a share differ"
        );
        // An item cannot move from one list to the other unnoticed.
        let mut moved = inputs(b"kernel", &none);
        moved.devices = &args;
        let mut other = inputs(b"kernel", &args);
        other.devices = &[];
        assert_ne!(moved.key(), other.key());
    }

    #[test]
    fn an_unusable_template_is_removed() {
        let root = std::env::temp_dir().join(format!("arrow-tpl-{}", std::process::id()));
        let cache = TemplateCache::new(root.clone());
        let dir = cache.dir("k");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmstate"), b"junk").unwrap();
        let found = cache.clone_vm("k", RestoreConfig::default()).unwrap();
        assert!(
            matches!(&found, CloneOutcome::Removed(_)),
            "{}",
            outcome_name(&found)
        );
        assert!(!dir.exists());
        let found = cache.clone_vm("absent", RestoreConfig::default()).unwrap();
        assert!(matches!(found, CloneOutcome::Absent));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_template_others_could_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("arrow-tpl-trust-{}", std::process::id()));
        let cache = TemplateCache::new(root.clone());
        let dir = cache.dir("k");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join("vmstate"), b"state").unwrap();
        std::fs::write(dir.join("memory"), b"memory").unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&dir.join("vmstate"), 0o600).unwrap();
        mode(&dir.join("memory"), 0o666).unwrap();
        assert!(trusted(&dir.join("vmstate"), false).is_ok());
        assert!(trusted(&dir.join("memory"), false)
            .unwrap_err()
            .contains("writable"));
        assert!(trusted(&dir, false).unwrap_err().contains("regular file"));
        // A clone refuses it and removes it, to be rebuilt.
        let found = cache.clone_vm("k", RestoreConfig::default()).unwrap();
        assert!(
            matches!(&found, CloneOutcome::Removed(why) if why.contains("not trusted")),
            "{}",
            outcome_name(&found)
        );
        assert!(!dir.exists());
        // A symlink is never a template file.
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("memory")).unwrap();
        assert!(trusted(&dir.join("memory"), false).is_err());
        // A cache others can write is an error, not a rebuild.
        std::fs::write(dir.join("vmstate"), b"state").unwrap();
        mode(&root, 0o777).unwrap();
        assert!(matches!(
            cache.clone_vm("k", RestoreConfig::default()),
            Err(TemplateError::UntrustedCache { .. })
        ));
        assert!(dir.exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn one_creator_at_a_time_and_a_waiter_can_be_cancelled() {
        let root = std::env::temp_dir().join(format!("arrow-tpl-lock-{}", std::process::id()));
        let cache = std::sync::Arc::new(TemplateCache::new(root.join("templates")));
        let none = Cancel::default();
        let first = cache.lock("k", &none).unwrap();
        assert!(root.join("templates/.k.lock").is_file());
        // Another key is independent.
        drop(cache.lock("other", &none).unwrap());

        // flock locks open files, so a second one conflicts even here.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let lock = cache.lock("k", &Cancel::default()).unwrap();
                tx.send(()).unwrap();
                drop(lock);
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the waiter got the lock once it was released");
        waiter.join().unwrap();

        let held = cache.lock("k", &none).unwrap();
        let cancel = Cancel::default();
        cancel.request("SIGTERM".into());
        let err = cache.lock("k", &cancel).err().unwrap();
        assert!(matches!(err, TemplateError::Interrupted(_)), "{err}");
        assert!(err.to_string().contains("SIGTERM"), "{err}");
        drop(held);
        std::fs::remove_dir_all(root).unwrap();
    }
}
