//! The template cache: booted-and-snapshotted VMs that later VMs are cloned
//! from instead of booting. A template is keyed by everything the guest
//! booted from and its shape, so a change to any of them makes a new one;
//! one that cannot be restored (stale format, other host, corrupt) is
//! removed and rebuilt, never used.

use std::path::PathBuf;

use anyhow::Context;
use sha2::{Digest, Sha256};
use vmm_core::snapshot::FORMAT_VERSION;
use vmm_core::vm::{RestoreConfig, Vm};

/// What a template is built from.
pub struct TemplateInputs<'a> {
    pub kernel: &'a [u8],
    pub initramfs: &'a [u8],
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub kernel_args: &'a [String],
    pub flavour: &'a str,
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
        for arg in self.kernel_args {
            h.update((arg.len() as u64).to_le_bytes());
            h.update(arg.as_bytes());
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
    /// one (an unusable one is removed, with a note on stderr).
    pub fn clone_vm(&self, key: &str, config: RestoreConfig) -> Option<Vm> {
        let dir = self.dir(key);
        if !dir.join(vmm_core::snapshot::VMSTATE_FILE).is_file() {
            return None;
        }
        match Vm::restore(&dir, config) {
            Ok(vm) => Some(vm),
            Err(e) => {
                eprintln!(
                    "arrow-vmm: template {} is unusable ({e}); removing it, it will be rebuilt",
                    dir.display()
                );
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }

    /// Snapshots the running `vm` as the template for `key` and lets it go
    /// on. Written to a private directory first and renamed into place, so a
    /// concurrent reader never sees half a template; if another process
    /// published one meanwhile, ours is dropped.
    pub fn publish(&self, key: &str, vm: &mut Vm) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
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
        let none: Vec<String> = vec![];
        assert_ne!(base, inputs(b"kernel", &none).key());
    }

    #[test]
    fn an_unusable_template_is_removed() {
        let root = std::env::temp_dir().join(format!("arrow-tpl-{}", std::process::id()));
        let cache = TemplateCache::new(root.clone());
        let dir = cache.dir("k");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmstate"), b"junk").unwrap();
        let config = RestoreConfig {
            console: vmm_core::vm::ConsoleOutput::Sink,
            vsock_uds_path: None,
            flavour: None,
        };
        assert!(cache.clone_vm("k", config).is_none());
        assert!(!dir.exists());
        assert!(cache
            .clone_vm(
                "absent",
                RestoreConfig {
                    console: vmm_core::vm::ConsoleOutput::Sink,
                    vsock_uds_path: None,
                    flavour: None,
                }
            )
            .is_none());
        std::fs::remove_dir_all(root).unwrap();
    }
}
