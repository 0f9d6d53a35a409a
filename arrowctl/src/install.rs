//! `arrow install` and `arrow uninstall`: put Arrow's files in place and
//! take exactly those changes back.
//!
//! Every file install writes is replaced atomically (a new file renamed over
//! the old, so a running shim or VMM keeps its inode), and what was there
//! before is kept as a hard link `NAME.arrow-backup` beside it: the very
//! bytes (or symlink) the operator had, restored by one rename. A record
//! (`/var/lib/arrow/install.json`) lists each file with that backup and the
//! digest of what install wrote, so uninstall can tell whether someone
//! changed the file since: an unchanged file gets its original back byte for
//! byte; a changed config loses only runtime arrow; any other changed file is
//! left alone and reported. Nothing else is touched; directories install had
//! to create stay.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::containerd_config::{self, ConfigVersion};
use crate::error::{Error, Result};
use crate::k3s_template;

/// The binaries a node needs, installed side by side: containerd finds the
/// shim on its PATH, the shim finds `arrow-vmm` beside itself, and
/// `arrow-vmm` finds `arrow-init` beside itself. `arrow` comes along so
/// `arrow uninstall` and `arrow check` are at hand.
pub const BINARIES: [&str; 4] = [
    "containerd-shim-arrow-v1",
    "arrow-vmm",
    "arrow-init",
    "arrow",
];
/// Where the record of an installation is kept by default.
pub const DEFAULT_RECORD: &str = "/var/lib/arrow/install.json";
/// Appended to a file's name for the copy of what it held before install.
pub const BACKUP_SUFFIX: &str = ".arrow-backup";

/// What kind of file an installed path is (decides how uninstall treats a
/// file changed since).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Binary,
    Kernel,
    ContainerdConfig,
    K3sTemplate,
}

/// One file install wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: Kind,
    /// What was there before, kept as a hard link; `None` if nothing was.
    pub backup: Option<PathBuf>,
    /// SHA-256 (hex) of what install left at `path`.
    pub installed_sha256: String,
}

/// Every file install wrote, in order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub entries: Vec<Entry>,
}

/// What install did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was there.
    Created,
    /// Replaced; the original is kept at the path given.
    Replaced(PathBuf),
    /// Replaced what an earlier `arrow install` wrote (its backup stays).
    Updated,
    /// Already as wanted.
    Unchanged,
}

/// One line of `arrow install`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub kind: Kind,
    pub outcome: Outcome,
}

/// What uninstall did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// The original is back, byte for byte.
    Restored,
    /// Install had created it; removed.
    Removed,
    /// Changed since install: only runtime arrow was taken out; the
    /// original as it was before install is still at the path given.
    EditedOut(Option<PathBuf>),
    /// Changed since install and not a config: left as it is.
    LeftAlone(Option<PathBuf>),
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads `path`, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path)(e)),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `data` to `path` atomically with `mode`: a temporary file in the
/// same directory, synced, renamed over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".arrow-new");
    let tmp = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(Error::io(&tmp))?;
    let result = file
        .write_all(data)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path)(e));
    }
    Ok(())
}

impl Record {
    /// Loads the record at `path`; empty when there is none.
    pub fn load(path: &Path) -> Result<Record> {
        match read_optional(path)? {
            None => Ok(Record::default()),
            Some(data) => serde_json::from_slice(&data).map_err(|e| Error::Record {
                path: path.to_path_buf(),
                what: e.to_string(),
            }),
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(|e| Error::Record {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        write_atomic(path, &data, 0o644)
    }
}

/// Writes files and keeps the record of what it changed, saved after each
/// file so an interrupted install can still be undone.
pub struct Installer {
    record_path: PathBuf,
    record: Record,
}

impl Installer {
    /// Continues the record at `record_path` (a second install adds to it).
    pub fn open(record_path: &Path) -> Result<Installer> {
        Ok(Installer {
            record_path: record_path.to_path_buf(),
            record: Record::load(record_path)?,
        })
    }

    /// Puts `data` at `path` (mode `mode`, or the old file's mode), keeping
    /// the old file as a backup the first time.
    pub fn put(
        &mut self,
        path: &Path,
        kind: Kind,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<Change> {
        let change = |outcome| Change {
            path: path.to_path_buf(),
            kind,
            outcome,
        };
        let current = read_optional(path)?;
        if current.as_deref() == Some(data) {
            return Ok(change(Outcome::Unchanged));
        }
        let old_mode = fs::metadata(path)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777);
        let mode = mode.or(old_mode).unwrap_or(0o644);
        let sha = sha256_hex(data);
        if let Some(entry) = self.record.entries.iter_mut().find(|e| e.path == path) {
            write_atomic(path, data, mode)?;
            entry.installed_sha256 = sha;
            self.record.save(&self.record_path)?;
            return Ok(change(Outcome::Updated));
        }
        let backup = match current {
            None => None,
            Some(_) => {
                let backup = with_suffix(path, BACKUP_SUFFIX);
                if fs::symlink_metadata(&backup).is_ok() {
                    return Err(Error::Refused {
                        path: path.to_path_buf(),
                        what: format!(
                            "{} already exists (from an install whose record is lost?); \
                             move it away to let arrow keep the current file there",
                            backup.display()
                        ),
                    });
                }
                // A hard link is the original itself (even a symlink:
                // link(2) does not follow), restored by one rename.
                fs::hard_link(path, &backup).map_err(Error::io(&backup))?;
                Some(backup)
            }
        };
        if let Err(e) = write_atomic(path, data, mode) {
            if let Some(backup) = &backup {
                let _ = fs::remove_file(backup);
            }
            return Err(e);
        }
        self.record.entries.push(Entry {
            path: path.to_path_buf(),
            kind,
            backup: backup.clone(),
            installed_sha256: sha,
        });
        self.record.save(&self.record_path)?;
        Ok(change(match backup {
            Some(b) => Outcome::Replaced(b),
            None => Outcome::Created,
        }))
    }
}

/// What `arrow install` is asked to do.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    /// Binaries to install: `(from, prefix)`; `None` leaves them alone.
    pub binaries: Option<(PathBuf, PathBuf)>,
    /// The guest kernel: `(source, destination)`.
    pub kernel: Option<(PathBuf, PathBuf)>,
    /// containerd's config and the version a new one gets.
    pub containerd: Option<(PathBuf, ConfigVersion)>,
    /// k3s's containerd template.
    pub k3s: Option<PathBuf>,
    /// The record of what install changed.
    pub record: PathBuf,
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// Runs `plan`. Configs are edited in memory first, so a config this tool
/// refuses stops the install before anything is written.
pub fn install(plan: &InstallPlan) -> Result<Vec<Change>> {
    let mut configs = Vec::new();
    if let Some((path, new_version)) = &plan.containerd {
        let text = read_text(path)?;
        let new = match &text {
            Some(t) if !t.trim().is_empty() => {
                containerd_config::add_runtime(t).map_err(|e| refused(path, e))?
            }
            _ => containerd_config::new_config(*new_version),
        };
        configs.push((path.clone(), Kind::ContainerdConfig, new));
    }
    if let Some(path) = &plan.k3s {
        let text = read_text(path)?.unwrap_or_default();
        let version =
            k3s_template::version_for(&path.file_name().unwrap_or_default().to_string_lossy());
        let new = k3s_template::add_block(&text, version).map_err(|e| refused(path, e))?;
        configs.push((path.clone(), Kind::K3sTemplate, new));
    }
    let mut files = Vec::new();
    if let Some((from, prefix)) = &plan.binaries {
        if !same_file(from, prefix) {
            for name in BINARIES {
                let src = from.join(name);
                let data = fs::read(&src).map_err(|e| Error::Refused {
                    path: src.clone(),
                    what: format!("{e}: build it with hack/build.sh, or pass --from DIR"),
                })?;
                // The guest has no dynamic loader: refuse cargo's dynamic
                // builds (target/release) before anything is installed.
                if name == "arrow-init"
                    && crate::check::elf_info(&data) != Some((crate::check::EM_X86_64, true))
                {
                    return Err(Error::Refused {
                        path: src,
                        what: "not a static x86-64 executable; arrow-init must be static: \
                               install hack/build.sh's build (target/arrow)"
                            .into(),
                    });
                }
                files.push((prefix.join(name), Kind::Binary, data, Some(0o755)));
            }
        }
    }
    if let Some((src, dest)) = &plan.kernel {
        if !same_file(src, dest) {
            let data = fs::read(src).map_err(|e| Error::Refused {
                path: src.clone(),
                what: format!("{e}: build it with hack/build-kernel.sh, or pass --kernel FILE"),
            })?;
            files.push((dest.clone(), Kind::Kernel, data, Some(0o644)));
        } else if !dest.is_file() {
            return Err(Error::Refused {
                path: dest.clone(),
                what: "no guest kernel here: build it with hack/build-kernel.sh, or pass --kernel FILE".into(),
            });
        }
    }
    let mut installer = Installer::open(&plan.record)?;
    let mut changes = Vec::new();
    for (path, kind, data, mode) in files {
        changes.push(installer.put(&path, kind, &data, mode)?);
    }
    for (path, kind, text) in configs {
        changes.push(installer.put(&path, kind, text.as_bytes(), None)?);
    }
    Ok(changes)
}

fn refused(path: &Path, e: Error) -> Error {
    Error::Refused {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match read_optional(path)? {
        None => Ok(None),
        Some(data) => String::from_utf8(data)
            .map(Some)
            .map_err(|_| Error::Refused {
                path: path.to_path_buf(),
                what: "not UTF-8 text".into(),
            }),
    }
}

/// Undoes what the record at `record` lists, newest first, then removes
/// the record. With `force`, files changed since install get their
/// originals back too.
pub fn uninstall(record: &Path, force: bool) -> Result<Vec<(Entry, Undo)>> {
    let mut rec = Record::load(record)?;
    let mut done = Vec::new();
    while let Some(entry) = rec.entries.pop() {
        let undo = undo_one(&entry, force)?;
        done.push((entry, undo));
        rec.save(record)?;
    }
    match fs::remove_file(record) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(record)(e)),
    }
    Ok(done)
}

fn undo_one(entry: &Entry, force: bool) -> Result<Undo> {
    let path = &entry.path;
    let current = read_optional(path)?;
    let untouched =
        current.as_deref().map(sha256_hex).as_deref() == Some(entry.installed_sha256.as_str());
    if untouched || force {
        return match &entry.backup {
            Some(backup) => {
                fs::rename(backup, path).map_err(Error::io(backup))?;
                Ok(Undo::Restored)
            }
            None => match fs::remove_file(path) {
                Ok(()) => Ok(Undo::Removed),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Undo::Removed),
                Err(e) => Err(Error::io(path)(e)),
            },
        };
    }
    let Some(current) = current else {
        return Ok(Undo::LeftAlone(entry.backup.clone()));
    };
    let text = String::from_utf8_lossy(&current);
    let edited = match entry.kind {
        Kind::ContainerdConfig => {
            containerd_config::remove_runtime(&text).map_err(|e| refused(path, e))?
        }
        Kind::K3sTemplate => k3s_template::remove_block(&text),
        Kind::Binary | Kind::Kernel => return Ok(Undo::LeftAlone(entry.backup.clone())),
    };
    if edited.as_bytes() != current.as_slice() {
        let mode = fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        write_atomic(path, edited.as_bytes(), mode)?;
    }
    Ok(Undo::EditedOut(entry.backup.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dir: &Path, config: &Path) -> InstallPlan {
        InstallPlan {
            binaries: None,
            kernel: None,
            containerd: Some((config.to_path_buf(), ConfigVersion::V2)),
            k3s: None,
            record: dir.join("state/install.json"),
        }
    }

    #[test]
    fn config_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let original = "# mine\nversion = 2\n\n[grpc]\n  address = \"/x\" # here\n";
        fs::write(&config, original).unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let p = plan(dir.path(), &config);
        let changes = install(&p).unwrap();
        assert_eq!(
            changes[0].outcome,
            Outcome::Replaced(dir.path().join("config.toml.arrow-backup"))
        );
        let installed = fs::read_to_string(&config).unwrap();
        assert!(containerd_config::has_runtime(&installed).unwrap());
        assert_eq!(
            fs::metadata(&config).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(install(&p).unwrap()[0].outcome, Outcome::Unchanged);
        assert_eq!(fs::read_to_string(&config).unwrap(), installed);
        let undone = uninstall(&p.record, false).unwrap();
        assert_eq!(undone[0].1, Undo::Restored);
        assert_eq!(fs::read_to_string(&config).unwrap(), original);
        assert!(!p.record.exists());
        assert!(!dir.path().join("config.toml.arrow-backup").exists());
    }

    #[test]
    fn absent_config_is_created_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/containerd/config.toml");
        let p = plan(dir.path(), &config);
        assert_eq!(install(&p).unwrap()[0].outcome, Outcome::Created);
        assert!(containerd_config::has_runtime(&fs::read_to_string(&config).unwrap()).unwrap());
        assert_eq!(uninstall(&p.record, false).unwrap()[0].1, Undo::Removed);
        assert!(!config.exists());
    }

    #[test]
    fn config_changed_since_install_keeps_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, "version = 2\n").unwrap();
        let p = plan(dir.path(), &config);
        install(&p).unwrap();
        let mut text = fs::read_to_string(&config).unwrap();
        text.push_str("\n[debug]\n  level = \"info\"\n");
        fs::write(&config, &text).unwrap();
        let undone = uninstall(&p.record, false).unwrap();
        assert!(matches!(undone[0].1, Undo::EditedOut(Some(_))));
        let now = fs::read_to_string(&config).unwrap();
        assert!(!containerd_config::has_runtime(&now).unwrap());
        assert!(now.contains("level = \"info\""));
    }

    #[test]
    fn unsupported_config_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, "version = 1\n").unwrap();
        let mut p = plan(dir.path(), &config);
        let bin = dir.path().join("bin");
        p.binaries = Some((dir.path().join("from"), bin.clone()));
        fs::create_dir(dir.path().join("from")).unwrap();
        for name in BINARIES {
            fs::write(dir.path().join("from").join(name), name).unwrap();
        }
        let err = install(&p).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        assert!(!bin.exists());
        assert!(!p.record.exists());
    }

    /// The smallest "static x86-64 executable" the check accepts.
    fn static_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        elf
    }

    #[test]
    fn refuses_a_dynamic_arrow_init() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(&from).unwrap();
        for name in BINARIES {
            fs::write(from.join(name), name).unwrap();
        }
        // This test binary is dynamic.
        fs::copy(std::env::current_exe().unwrap(), from.join("arrow-init")).unwrap();
        let p = InstallPlan {
            binaries: Some((from, dir.path().join("bin"))),
            kernel: None,
            containerd: None,
            k3s: None,
            record: dir.path().join("install.json"),
        };
        let err = install(&p).unwrap_err();
        assert!(err.to_string().contains("must be static"), "{err}");
        assert!(!dir.path().join("bin").exists());
    }

    #[test]
    fn binaries_and_kernel_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        let prefix = dir.path().join("bin");
        fs::create_dir_all(&from).unwrap();
        fs::create_dir_all(&prefix).unwrap();
        for name in BINARIES {
            fs::write(from.join(name), format!("new {name}")).unwrap();
        }
        fs::write(from.join("arrow-init"), static_elf()).unwrap();
        // An older arrow-vmm is there already; the kernel is a symlink.
        fs::write(prefix.join("arrow-vmm"), "old").unwrap();
        fs::write(dir.path().join("vmlinux-old"), "old kernel").unwrap();
        let dest = dir.path().join("vmlinux");
        std::os::unix::fs::symlink("vmlinux-old", &dest).unwrap();
        fs::write(dir.path().join("vmlinux-new"), "new kernel").unwrap();
        let p = InstallPlan {
            binaries: Some((from.clone(), prefix.clone())),
            kernel: Some((dir.path().join("vmlinux-new"), dest.clone())),
            containerd: None,
            k3s: None,
            record: dir.path().join("install.json"),
        };
        let changes = install(&p).unwrap();
        assert_eq!(changes.len(), 5);
        assert!(changes
            .iter()
            .all(|c| matches!(c.outcome, Outcome::Created | Outcome::Replaced(_))));
        assert_eq!(
            fs::read_to_string(prefix.join("arrow-vmm")).unwrap(),
            "new arrow-vmm"
        );
        let mode = fs::metadata(prefix.join("arrow-init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read_to_string(&dest).unwrap(), "new kernel");
        assert!(install(&p)
            .unwrap()
            .iter()
            .all(|c| c.outcome == Outcome::Unchanged));
        // A rebuilt shim replaces the installed one; the first backup stays.
        fs::write(from.join("arrow-vmm"), "newer").unwrap();
        let again = install(&p).unwrap();
        assert!(again.iter().any(|c| c.outcome == Outcome::Updated));
        uninstall(&p.record, false).unwrap();
        assert_eq!(fs::read_to_string(prefix.join("arrow-vmm")).unwrap(), "old");
        assert!(!prefix.join("arrow-init").exists());
        assert_eq!(fs::read_link(&dest).unwrap(), Path::new("vmlinux-old"));
    }

    #[test]
    fn changed_binary_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut installer = Installer::open(&dir.path().join("r.json")).unwrap();
        let bin = dir.path().join("arrow-vmm");
        installer
            .put(&bin, Kind::Binary, b"ours", Some(0o755))
            .unwrap();
        fs::write(&bin, "someone else's").unwrap();
        let undone = uninstall(&dir.path().join("r.json"), false).unwrap();
        assert_eq!(undone[0].1, Undo::LeftAlone(None));
        assert!(bin.exists());
    }

    #[test]
    fn refuses_to_overwrite_a_stray_backup() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, "version = 2\n").unwrap();
        fs::write(dir.path().join("config.toml.arrow-backup"), "precious").unwrap();
        let err = install(&plan(dir.path(), &config)).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        assert_eq!(fs::read_to_string(&config).unwrap(), "version = 2\n");
    }
}
