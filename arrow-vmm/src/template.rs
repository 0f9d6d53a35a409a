//! The template cache: booted-and-snapshotted VMs that later VMs are cloned
//! from instead of booting. A template is keyed by everything the guest
//! booted from, its shape and its devices, so a change to any of them makes
//! a new one; one that cannot be restored (stale format, other host,
//! corrupt) is removed and rebuilt, never used.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use vmm_core::snapshot::FORMAT_VERSION;
use vmm_core::vm::{RestoreConfig, Vm};

use crate::cancel::Cancel;

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

    /// A clone of the template with `key`, or `None` when there is no usable
    /// one (an unusable one is removed, with a note on stderr). Failures
    /// that are not the template's fault (the socket path is taken, the
    /// shared directory is missing, no KVM) are errors and leave it alone.
    pub fn clone_vm(&self, key: &str, config: RestoreConfig) -> anyhow::Result<Option<Vm>> {
        let dir = self.dir(key);
        if !dir.join(vmm_core::snapshot::VMSTATE_FILE).is_file() {
            return Ok(None);
        }
        trusted(&self.root, true)
            .map_err(|why| anyhow::anyhow!("template cache {}: {why}", self.root.display()))?;
        let files = [
            vmm_core::snapshot::VMSTATE_FILE,
            vmm_core::snapshot::MEMORY_FILE,
        ];
        let untrusted = trusted(&dir, true).err().or_else(|| {
            files
                .iter()
                .find_map(|f| trusted(&dir.join(f), false).err())
        });
        if let Some(why) = untrusted {
            eprintln!(
                "arrow-vmm: template {} is not trusted ({why}); removing it, it will be rebuilt",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(None);
        }
        match Vm::restore(&dir, config) {
            Ok(vm) => Ok(Some(vm)),
            Err(e) if e.is_snapshot_fault() => {
                eprintln!(
                    "arrow-vmm: template {} is unusable ({e}); removing it, it will be rebuilt",
                    dir.display()
                );
                let _ = std::fs::remove_dir_all(&dir);
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("cloning template {}", dir.display())),
        }
    }

    /// Creates the cache directory if missing. Modes are explicit: the
    /// process umask is cleared once a virtio-fs device is set up.
    pub fn create_root(&self) -> anyhow::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))
    }

    /// Takes the lock for creating the template with `key` (an exclusive
    /// `flock` on `.<key>.lock` in the cache), waiting while another
    /// process holds it, until `cancel` is requested. The kernel drops the
    /// lock when its holder dies, so a crashed creator blocks nobody.
    pub fn lock(&self, key: &str, cancel: &Cancel) -> anyhow::Result<TemplateLock> {
        self.create_root()?;
        let path = self.root.join(format!(".{key}.lock"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(TemplateLock { _flock: flock }),
                Err((f, Errno::EWOULDBLOCK)) => {
                    file = f;
                    cancel.check()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()))
                }
            }
        }
    }

    /// Snapshots the running `vm` as the template for `key` and lets it go
    /// on. Written to a private directory first and renamed into place, so a
    /// concurrent reader never sees half a template; if another process
    /// published one meanwhile, ours is dropped.
    pub fn publish(&self, key: &str, vm: &mut Vm) -> anyhow::Result<PathBuf> {
        self.create_root()?;
        let tmp = self.root.join(format!(".{key}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = vm
            .snapshot(&tmp, true)
            .context("snapshotting the template VM");
        let dir = self.dir(key);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
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
        assert!(cache
            .clone_vm("k", RestoreConfig::default())
            .unwrap()
            .is_none());
        assert!(!dir.exists());
        assert!(cache
            .clone_vm("absent", RestoreConfig::default())
            .unwrap()
            .is_none());
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
        assert!(cache
            .clone_vm("k", RestoreConfig::default())
            .unwrap()
            .is_none());
        assert!(!dir.exists());
        // A symlink is never a template file.
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("memory")).unwrap();
        assert!(trusted(&dir.join("memory"), false).is_err());
        // A cache others can write is an error, not a rebuild.
        std::fs::write(dir.join("vmstate"), b"state").unwrap();
        mode(&root, 0o777).unwrap();
        assert!(cache.clone_vm("k", RestoreConfig::default()).is_err());
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
        assert!(err.to_string().contains("SIGTERM"), "{err}");
        drop(held);
        std::fs::remove_dir_all(root).unwrap();
    }
}
