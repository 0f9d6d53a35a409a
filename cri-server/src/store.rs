//! The image store under `root`:
//!
//! ```text
//! <root>/
//!   lock                    flock: one arrow-cri per root
//!   meta.json               images, layers and rootfs leases (atomic rewrite)
//!   blobs/sha256/<hex>      content-addressed blobs: manifests, indexes,
//!                           configs, compressed layers (verified on download)
//!   layers/<n>/             each layer unpacked once (overlayfs lower dir),
//!                           named by a short number so that an image's
//!                           lowerdir list fits in one mount(2) page
//!   rootfs/<container>/     upper/ and work/ of a container's overlay (part 2)
//!   tmp/                    downloads and unpacks in progress; emptied at start
//! ```
//!
//! Metadata changes only after the files they name are complete (renamed
//! into place), so a crash or a failed pull leaves at worst unreferenced
//! files, which garbage collection removes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reference::{is_digest, ImageRef};
use crate::unpack;

const META_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerDesc {
    /// Digest of the blob as the registry serves it.
    pub digest: String,
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The config's digest (`sha256:…`), the image's id as in containerd.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// The index the manifest was chosen from, if any.
    pub index_digest: Option<String>,
    pub layers: Vec<LayerDesc>,
    /// Manifest + config + compressed layers, as containerd counts it.
    pub size: u64,
    /// The image config's `User`.
    pub user: String,
    /// Seconds since the epoch.
    pub pulled_at: u64,
}

impl ImageRecord {
    pub fn config_digest(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Directory number under `layers/`.
    pub id: u64,
    /// Bytes of file content unpacked.
    pub unpacked_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootfsRecord {
    pub image_id: String,
    /// Layer directory numbers, bottom first.
    pub layers: Vec<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    version: u32,
    next_layer: u64,
    images: BTreeMap<String, ImageRecord>,
    /// By diff_id.
    layers: BTreeMap<String, LayerRecord>,
    /// By container id.
    rootfs: BTreeMap<String, RootfsRecord>,
}

/// One mount of a container's root, as containerd's snapshotter hands them
/// to a shim (`type`, `source`, `options`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

pub struct Store {
    root: PathBuf,
    meta: Mutex<Meta>,
    pinned: Vec<String>,
    /// Pulls hold it shared, garbage collection exclusively: GC never takes
    /// the files of a pull in progress.
    pub gc_lock: tokio::sync::RwLock<()>,
    /// One download or unpack per blob / layer at a time.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    tmp_counter: AtomicU64,
    usage: Mutex<Option<FsUsage>>,
    _lock: fs::File,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct FsUsage {
    pub bytes: u64,
    pub inodes: u64,
}

fn io_err<'a, D: std::fmt::Display + 'a>(
    root: &'a Path,
    what: D,
) -> impl Fn(io::Error) -> Error + 'a {
    move |e| Error::io(&what, root, &e)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A containerd identifier: `[A-Za-z0-9]+` joined by single `.`, `_`, `-`,
/// at most 76 characters (ids become path components).
pub fn valid_id(id: &str) -> bool {
    if id.is_empty() || id.len() > 76 {
        return false;
    }
    let b = id.as_bytes();
    let sep = |c: u8| c == b'.' || c == b'_' || c == b'-';
    b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || sep(c))
        && !b.windows(2).any(|w| sep(w[0]) && sep(w[1]))
}

impl Store {
    /// Opens (creating) the store at `root`; removes what a crash left.
    pub fn open(root: &Path, pinned: &[String]) -> anyhow::Result<Store> {
        use anyhow::Context;
        for dir in ["blobs/sha256", "layers", "rootfs", "tmp"] {
            fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating {}", root.join(dir).display()))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o711))?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        if let Err(e) =
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            anyhow::bail!(
                "{} is in use by another arrow-cri ({e}): give this one its own --root",
                root.display()
            );
        }
        let meta_path = root.join("meta.json");
        let meta: Meta = match fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", meta_path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta {
                version: META_VERSION,
                ..Meta::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", meta_path.display())),
        };
        if meta.version > META_VERSION {
            anyhow::bail!(
                "{} is of a newer arrow-cri (format {}, this one reads {META_VERSION})",
                meta_path.display(),
                meta.version
            );
        }
        // Downloads and unpacks interrupted by a crash.
        unpack::remove_tree(&root.join("tmp"))?;
        fs::create_dir_all(root.join("tmp"))?;
        let pinned = pinned
            .iter()
            .filter_map(|p| match ImageRef::parse(p) {
                Ok(r) => Some(r.to_string()),
                Err(e) => {
                    tracing::warn!(image = %p, error = %e, "pinned image name ignored");
                    None
                }
            })
            .collect();
        let store = Store {
            root: root.to_path_buf(),
            meta: Mutex::new(meta),
            pinned,
            gc_lock: tokio::sync::RwLock::new(()),
            inflight: Mutex::new(HashMap::new()),
            tmp_counter: AtomicU64::new(0),
            usage: Mutex::new(None),
            _lock: lock,
        };
        let removed = store.gc_locked().map_err(|e| anyhow::anyhow!("{e}"))?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed unreferenced blobs and layers left from before"
            );
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn save(&self, meta: &Meta) -> Result<()> {
        let path = self.root.join("meta.json");
        let tmp = self.root.join("meta.json.tmp");
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| Error::Internal(e.to_string()))?;
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.root)?.sync_all()
        };
        write().map_err(io_err(&self.root, "saving the image metadata"))?;
        *self.usage.lock().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        is_digest(digest) && self.blob_path(digest).is_file()
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        if !is_digest(digest) {
            return Err(Error::InvalidArgument(format!(
                "{digest:?} is not a sha256 digest"
            )));
        }
        fs::read(self.blob_path(digest))
            .map_err(io_err(&self.root, format!("reading blob {digest}")))
    }

    /// A fresh path under `tmp/`.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Moves a verified file into the blob store.
    pub fn commit_blob(&self, tmp: &Path, digest: &str) -> Result<()> {
        fs::rename(tmp, self.blob_path(digest))
            .map_err(io_err(&self.root, format!("storing blob {digest}")))
    }

    /// Writes a verified in-memory blob (manifests, configs).
    pub fn write_blob(&self, digest: &str, data: &[u8]) -> Result<()> {
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp = self.tmp_path("blob");
        fs::write(&tmp, data).map_err(io_err(&self.root, format!("writing blob {digest}")))?;
        self.commit_blob(&tmp, digest)
    }

    /// The lock serialising work on one blob or layer (`key`).
    pub fn inflight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, v| Arc::strong_count(v) > 1);
        map.entry(key.to_string()).or_default().clone()
    }

    pub fn layer(&self, diff_id: &str) -> Option<LayerRecord> {
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .layers
            .get(diff_id)
            .cloned()
    }

    pub fn layer_dir(&self, id: u64) -> PathBuf {
        self.root.join("layers").join(id.to_string())
    }

    /// Moves an unpacked, verified layer into place and records it.
    pub fn commit_layer(
        &self,
        tmp_dir: &Path,
        diff_id: &str,
        unpacked_bytes: u64,
    ) -> Result<LayerRecord> {
        let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = meta.layers.get(diff_id) {
            return Ok(existing.clone());
        }
        let id = meta.next_layer;
        let dir = self.layer_dir(id);
        if dir.exists() {
            unpack::remove_tree(&dir)
                .map_err(io_err(&self.root, "removing a stale layer directory"))?;
        }
        fs::rename(tmp_dir, &dir)
            .map_err(io_err(&self.root, format!("storing layer {diff_id}")))?;
        meta.next_layer += 1;
        let record = LayerRecord { id, unpacked_bytes };
        meta.layers.insert(diff_id.to_string(), record.clone());
        self.save(&meta)?;
        Ok(record)
    }

    /// Records a pulled image (its files all in place) under `tag` (if any)
    /// and `repo_digest`; the tag leaves any other image that had it.
    pub fn commit_image(
        &self,
        mut record: ImageRecord,
        tag: Option<String>,
        repo_digest: String,
    ) -> Result<ImageRecord> {
        let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        for layer in &record.layers {
            if !meta.layers.contains_key(&layer.diff_id) {
                return Err(Error::Internal(format!(
                    "layer {} of image {} is not in the store",
                    layer.diff_id, record.id
                )));
            }
        }
        if let Some(tag) = &tag {
            for (id, other) in meta.images.iter_mut() {
                if *id != record.id {
                    other.repo_tags.retain(|t| t != tag);
                }
            }
        }
        let merged = match meta.images.remove(&record.id) {
            Some(mut old) => {
                if let Some(tag) = &tag {
                    if !old.repo_tags.contains(tag) {
                        old.repo_tags.push(tag.clone());
                    }
                }
                if !old.repo_digests.contains(&repo_digest) {
                    old.repo_digests.push(repo_digest);
                }
                old.pulled_at = record.pulled_at;
                old
            }
            None => {
                record.repo_tags = tag.into_iter().collect();
                record.repo_digests = vec![repo_digest];
                record.pulled_at = now_secs();
                record
            }
        };
        meta.images.insert(merged.id.clone(), merged.clone());
        // The manifest and config blobs on disk before the record.
        let sync =
            fs::File::open(&self.root).and_then(|f| rustix::fs::syncfs(&f).map_err(Into::into));
        sync.map_err(io_err(&self.root, "syncing the store"))?;
        self.save(&meta)?;
        Ok(merged)
    }

    pub fn images(&self) -> Vec<ImageRecord> {
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .images
            .values()
            .cloned()
            .collect()
    }

    /// An image by id (full, or a unique prefix of its hex), tag, or digest
    /// reference; short names are normalised.
    pub fn find(&self, reference: &str) -> Option<ImageRecord> {
        let meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        find_in(&meta, reference).cloned()
    }

    pub fn is_pinned(&self, image: &ImageRecord) -> bool {
        image.repo_tags.iter().any(|t| self.pinned.contains(t))
            || image.repo_digests.iter().any(|d| self.pinned.contains(d))
    }

    /// Containers whose rootfs comes from `image_id`.
    pub fn users(&self, image_id: &str) -> Vec<String> {
        let meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        meta.rootfs
            .iter()
            .filter(|(_, r)| r.image_id == image_id)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Removes an image (all its names, as containerd's CRI does) and
    /// collects what no image uses any more. Unknown images are no error
    /// (CRI: RemoveImage is idempotent). The caller holds `gc_lock`.
    pub fn remove_image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let removed = {
            let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(image) = find_in(&meta, reference).cloned() else {
                return Ok(None);
            };
            let users: Vec<_> = meta
                .rootfs
                .iter()
                .filter(|(_, r)| r.image_id == image.id)
                .map(|(c, _)| c.clone())
                .collect();
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "image {reference} ({}) is in use by container(s) {}: remove them first",
                    image.id,
                    users.join(", ")
                )));
            }
            if self.is_pinned(&image) {
                return Err(Error::FailedPrecondition(format!(
                    "image {reference} ({}) is pinned (config image.pinned_images): take it off that list to remove it",
                    image.id
                )));
            }
            meta.images.remove(&image.id);
            self.save(&meta)?;
            image
        };
        self.gc_locked()?;
        Ok(Some(removed))
    }

    /// Removes layers and blobs no image or rootfs references, and files
    /// no metadata names. The caller holds `gc_lock` exclusively (or is
    /// `open`). Returns how many were removed.
    pub fn gc_locked(&self) -> Result<usize> {
        let mut removed = 0;
        let (keep_layers, keep_blobs) = {
            let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
            let mut used_diff_ids = BTreeSet::new();
            let mut blobs = BTreeSet::new();
            for image in meta.images.values() {
                blobs.insert(image.id.clone());
                blobs.insert(image.manifest_digest.clone());
                if let Some(i) = &image.index_digest {
                    blobs.insert(i.clone());
                }
                for l in &image.layers {
                    used_diff_ids.insert(l.diff_id.clone());
                    blobs.insert(l.digest.clone());
                }
            }
            let rootfs_layers: BTreeSet<u64> = meta
                .rootfs
                .values()
                .flat_map(|r| r.layers.iter().copied())
                .collect();
            let before = meta.layers.len();
            meta.layers.retain(|diff_id, l| {
                used_diff_ids.contains(diff_id) || rootfs_layers.contains(&l.id)
            });
            if meta.layers.len() != before {
                self.save(&meta)?;
            }
            let keep: BTreeSet<String> = meta.layers.values().map(|l| l.id.to_string()).collect();
            let blobs: BTreeSet<String> = blobs
                .iter()
                .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
                .collect();
            (keep, blobs)
        };
        let layers_dir = self.root.join("layers");
        for entry in fs::read_dir(&layers_dir).map_err(io_err(&self.root, "listing layers"))? {
            let entry = entry.map_err(io_err(&self.root, "listing layers"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep_layers.contains(&name) {
                tracing::debug!(layer = %name, "removing unused layer");
                unpack::remove_tree(&entry.path())
                    .map_err(io_err(&self.root, format!("removing layer {name}")))?;
                removed += 1;
            }
        }
        let blobs_dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs_dir).map_err(io_err(&self.root, "listing blobs"))? {
            let entry = entry.map_err(io_err(&self.root, "listing blobs"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep_blobs.contains(&name) {
                tracing::debug!(blob = %name, "removing unused blob");
                fs::remove_file(entry.path())
                    .map_err(io_err(&self.root, format!("removing blob {name}")))?;
                removed += 1;
            }
        }
        if removed > 0 {
            *self.usage.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        Ok(removed)
    }

    /// Bytes and inodes the store uses (cached until it changes).
    pub fn usage(&self) -> Result<FsUsage> {
        if let Some(u) = *self.usage.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(u);
        }
        let (bytes, inodes) =
            unpack::disk_usage(&self.root).map_err(io_err(&self.root, "measuring the store"))?;
        let u = FsUsage { bytes, inodes };
        *self.usage.lock().unwrap_or_else(PoisonError::into_inner) = Some(u);
        Ok(u)
    }

    // ---- container roots (part 2) ----

    pub fn rootfs_dir(&self, container_id: &str) -> PathBuf {
        self.root.join("rootfs").join(container_id)
    }

    /// A fresh overlayfs root for `container_id` from `image`'s layers: its
    /// upper and work directories are made and the container is recorded as
    /// a user of the image (which then cannot be removed). Returns the mount
    /// that gives the root, as containerd's overlay snapshotter does; the
    /// runtime (or [`mount_rootfs`]) mounts it where it wants it.
    pub fn create_rootfs(&self, container_id: &str, image: &str) -> Result<Vec<Mount>> {
        if !valid_id(container_id) {
            return Err(Error::InvalidArgument(format!(
                "container id {container_id:?} must be [A-Za-z0-9] joined by single . _ -, at most 76 characters"
            )));
        }
        let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        if meta.rootfs.contains_key(container_id) {
            return Err(Error::FailedPrecondition(format!(
                "container {container_id} already has a root filesystem"
            )));
        }
        let image = find_in(&meta, image).cloned().ok_or_else(|| {
            Error::NotFound(format!("image {image} is not in the store: pull it first"))
        })?;
        let mut layers = Vec::new();
        for l in &image.layers {
            let rec = meta.layers.get(&l.diff_id).ok_or_else(|| {
                Error::Internal(format!(
                    "layer {} of image {} is missing",
                    l.diff_id, image.id
                ))
            })?;
            layers.push(rec.id);
        }
        let dir = self.rootfs_dir(container_id);
        let make = || -> io::Result<()> {
            fs::create_dir(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
            fs::create_dir(dir.join("upper"))?;
            fs::set_permissions(dir.join("upper"), fs::Permissions::from_mode(0o755))?;
            fs::create_dir(dir.join("work"))?;
            if layers.is_empty() {
                fs::create_dir(dir.join("empty"))?;
            }
            Ok(())
        };
        if let Err(e) = make() {
            let _ = unpack::remove_tree(&dir);
            return Err(Error::io(
                format!("creating the root of container {container_id}"),
                &self.root,
                &e,
            ));
        }
        meta.rootfs.insert(
            container_id.to_string(),
            RootfsRecord {
                image_id: image.id.clone(),
                layers,
            },
        );
        if let Err(e) = self.save(&meta) {
            meta.rootfs.remove(container_id);
            let _ = unpack::remove_tree(&dir);
            return Err(e);
        }
        Ok(self.mounts_of(container_id, &meta.rootfs[container_id]))
    }

    fn mounts_of(&self, container_id: &str, rec: &RootfsRecord) -> Vec<Mount> {
        let dir = self.rootfs_dir(container_id);
        let lower: Vec<String> = if rec.layers.is_empty() {
            vec![dir.join("empty").display().to_string()]
        } else {
            // overlayfs: the topmost layer first.
            rec.layers
                .iter()
                .rev()
                .map(|id| self.layer_dir(*id).display().to_string())
                .collect()
        };
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}", lower.join(":")),
                format!("upperdir={}", dir.join("upper").display()),
                format!("workdir={}", dir.join("work").display()),
                "index=off".into(),
            ],
        }]
    }

    /// The mounts of an existing container root.
    pub fn rootfs_mounts(&self, container_id: &str) -> Option<Vec<Mount>> {
        let meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        meta.rootfs
            .get(container_id)
            .map(|r| self.mounts_of(container_id, r))
    }

    /// Removes a container's root (it must not be mounted any more) and its
    /// hold on the image. Unknown containers are no error.
    pub fn remove_rootfs(&self, container_id: &str) -> Result<()> {
        if !valid_id(container_id) {
            return Err(Error::InvalidArgument(format!(
                "container id {container_id:?} is not valid"
            )));
        }
        let dir = self.rootfs_dir(container_id);
        unpack::remove_tree(&dir).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                Error::FailedPrecondition(format!(
                    "the root of container {container_id} is still mounted: unmount it first"
                ))
            } else {
                Error::io(
                    format!("removing the root of container {container_id}"),
                    &self.root,
                    &e,
                )
            }
        })?;
        let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        if meta.rootfs.remove(container_id).is_some() {
            self.save(&meta)?;
        }
        Ok(())
    }
}

/// Mounts `mounts` (from [`Store::create_rootfs`]) on `target`, with
/// `nodev` like every mount in a pod's share.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> io::Result<()> {
    for m in mounts {
        let data = std::ffi::CString::new(m.options.join(","))
            .map_err(|_| io::Error::other("mount options with a NUL byte"))?;
        rustix::mount::mount(
            m.source.as_str(),
            target,
            m.kind.as_str(),
            rustix::mount::MountFlags::NODEV,
            Some(data.as_c_str()),
        )?;
    }
    Ok(())
}

/// Unmounts a root mounted by [`mount_rootfs`].
pub fn unmount_rootfs(target: &Path) -> io::Result<()> {
    rustix::mount::unmount(target, rustix::mount::UnmountFlags::NOFOLLOW)?;
    Ok(())
}

fn find_in<'m>(meta: &'m Meta, reference: &str) -> Option<&'m ImageRecord> {
    let r = reference.trim();
    if r.is_empty() {
        return None;
    }
    // By id: sha256:<hex>, <hex>, or a unique hex prefix (at least 12).
    let hex = r.strip_prefix("sha256:").unwrap_or(r);
    if hex.len() >= 12 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut found = meta.images.values().filter(|i| {
            i.id.strip_prefix("sha256:")
                .is_some_and(|h| h.starts_with(hex))
        });
        if let (Some(one), None) = (found.next(), found.next()) {
            return Some(one);
        }
    }
    let parsed = ImageRef::parse(r).ok()?;
    if let Some(d) = &parsed.digest {
        let want = parsed.with_digest(d);
        return meta
            .images
            .values()
            .find(|i| i.repo_digests.contains(&want));
    }
    let tagged = parsed.tagged()?;
    meta.images.values().find(|i| i.repo_tags.contains(&tagged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("abc"));
        assert!(valid_id("a.b-c_d"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id("a..b"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(77)));
    }
}
