//! OCI image layout tarballs from a directory tree, made without a registry or
//! a daemon: one gzip layer, an image config, a manifest, and an `index.json`
//! that names the image, in the form `ctr images import` (containerd 1.6 and
//! later) and other OCI tools load.
//!
//! The output is reproducible: entries are sorted, owners are root, times are
//! zero, and gzip carries no timestamp, so the same tree and settings give
//! the same digests, whichever machine builds them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Media types of what an image holds (OCI image spec 1.0).
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The annotation containerd takes the image's full name from on import.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation naming a manifest in an index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The `PATH` an image gets when its settings name none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the image config says about running the image.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Full reference, e.g. `localhost/arrow/busybox:latest`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` pairs; [`DEFAULT_PATH`] is added when none sets `PATH`.
    pub env: Vec<String>,
    pub working_dir: String,
    /// Empty for root.
    pub user: String,
    pub labels: BTreeMap<String, String>,
}

impl ImageSettings {
    /// Settings with only a name: no entrypoint or command, workdir `/`.
    pub fn new(name: &str) -> Self {
        ImageSettings {
            name: name.to_string(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: Vec::new(),
            working_dir: "/".to_string(),
            user: String::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// The digests of an image written by [`write_oci_archive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// `sha256:…` of the manifest: the image's digest in containerd.
    pub manifest_digest: String,
    pub config_digest: String,
    /// `sha256:…` of the compressed layer.
    pub layer_digest: String,
    /// `sha256:…` of the uncompressed layer (the config's `diff_ids`).
    pub diff_id: String,
    pub layer_size: u64,
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Tar header with the reproducible fields set: root owner, time zero.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// An uncompressed tar of the tree under `root`, paths relative to it, in
/// sorted order; symbolic links stay links, hard links within the tree
/// become tar hard links. Sockets and device nodes are refused.
pub fn layer_tar(root: &Path) -> Result<Vec<u8>> {
    let meta = fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    add_dir(&mut builder, root, Path::new(""), &mut links)?;
    Ok(builder.into_inner()?)
}

fn add_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel_path = rel.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.mode() & 0o7777;
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut h = header(tar::EntryType::Directory, mode, 0);
            builder.append_data(&mut h, &rel_path, std::io::empty())?;
            add_dir(builder, &path, &rel_path, links)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder.append_link(&mut h, &rel_path, &target)?;
        } else if kind.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    let mut h = header(tar::EntryType::Link, mode, 0);
                    builder.append_link(&mut h, &rel_path, first)?;
                    continue;
                }
                links.insert(key, rel_path.clone());
            }
            let mut h = header(tar::EntryType::Regular, mode, meta.len());
            let file =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            builder.append_data(&mut h, &rel_path, file)?;
        } else if kind.is_fifo() {
            let mut h = header(tar::EntryType::Fifo, mode, 0);
            builder.append_data(&mut h, &rel_path, std::io::empty())?;
        } else {
            bail!(
                "{}: sockets and device nodes have no place in a test image",
                path.display()
            );
        }
    }
    Ok(())
}

/// Gzip without a timestamp or file name, so equal input gives equal bytes.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

/// The image config JSON for a layer with `diff_id`.
pub fn image_config(settings: &ImageSettings, diff_id: &str) -> serde_json::Value {
    let mut env = settings.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let mut config = serde_json::Map::new();
    if !settings.user.is_empty() {
        config.insert("User".into(), json!(settings.user));
    }
    config.insert("Env".into(), json!(env));
    if !settings.entrypoint.is_empty() {
        config.insert("Entrypoint".into(), json!(settings.entrypoint));
    }
    if !settings.cmd.is_empty() {
        config.insert("Cmd".into(), json!(settings.cmd));
    }
    config.insert("WorkingDir".into(), json!(settings.working_dir));
    if !settings.labels.is_empty() {
        config.insert("Labels".into(), json!(settings.labels));
    }
    json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "arrow-image" }],
    })
}

/// Writes an OCI image layout of the tree under `rootfs` as a tar file at
/// `out` (atomically: a temporary file renamed into place).
pub fn write_oci_archive(
    rootfs: &Path,
    settings: &ImageSettings,
    out: &Path,
) -> Result<BuiltImage> {
    if settings.name.is_empty() {
        bail!("the image needs a name");
    }
    let layer = layer_tar(rootfs)?;
    let diff_id = sha256(&layer);
    let layer_gz = gzip(&layer)?;
    drop(layer);
    let layer_digest = sha256(&layer_gz);

    let config = serde_json::to_vec(&image_config(settings, &diff_id))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER_GZIP, "digest": layer_digest, "size": layer_gz.len() }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                ANNOTATION_CONTAINERD_NAME: settings.name,
                ANNOTATION_REF_NAME: settings.name,
            },
        }],
    }))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let blob = |digest: &str| format!("blobs/sha256/{}", &digest["sha256:".len()..]);
    let mut archive = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        archive.append_data(&mut h, dir, std::io::empty())?;
    }
    let files: [(String, &[u8]); 5] = [
        ("oci-layout".into(), layout),
        ("index.json".into(), &index),
        (blob(&manifest_digest), &manifest),
        (blob(&config_digest), &config),
        (blob(&layer_digest), &layer_gz),
    ];
    for (path, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        archive.append_data(&mut h, path, data)?;
    }
    let bytes = archive.into_inner()?;

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(BuiltImage {
        manifest_digest,
        config_digest,
        layer_digest,
        diff_id,
        layer_size: layer_gz.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tree() -> tempdir::Dir {
        let dir = tempdir::Dir::new("image");
        fs::create_dir_all(dir.0.join("bin")).unwrap();
        fs::create_dir_all(dir.0.join("tmp")).unwrap();
        fs::write(dir.0.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            dir.0.join("bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("tool", dir.0.join("bin/alias")).unwrap();
        fs::hard_link(dir.0.join("bin/tool"), dir.0.join("bin/hard")).unwrap();
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(tag: &str) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "arrow-{tag}-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn layer_is_sorted_and_keeps_links() {
        let dir = tree();
        let layer = layer_tar(&dir.0).unwrap();
        let mut archive = tar::Archive::new(&layer[..]);
        let entries: Vec<(String, tar::EntryType, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/alias", "bin/hard", "bin/tool", "tmp"]);
        assert_eq!(entries[1].1, tar::EntryType::Symlink);
        assert_eq!(entries[1].2.as_deref(), Some("tool"));
        // `hard` sorts first, so it holds the data and `tool` links to it.
        assert_eq!(entries[2].1, tar::EntryType::Regular);
        assert_eq!(entries[3].1, tar::EntryType::Link);
        assert_eq!(entries[3].2.as_deref(), Some("bin/hard"));
    }

    #[test]
    fn archive_is_a_reproducible_oci_layout() {
        let dir = tree();
        let out = tempdir::Dir::new("image-out");
        let mut settings = ImageSettings::new("localhost/arrow/test:latest");
        settings.cmd = vec!["sh".into()];
        let a = write_oci_archive(&dir.0, &settings, &out.0.join("a.tar")).unwrap();
        let b = write_oci_archive(&dir.0, &settings, &out.0.join("b.tar")).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            fs::read(out.0.join("a.tar")).unwrap(),
            fs::read(out.0.join("b.tar")).unwrap()
        );

        let bytes = fs::read(out.0.join("a.tar")).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut files = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["digest"], a.manifest_digest.as_str());
        assert_eq!(
            desc["annotations"][ANNOTATION_REF_NAME],
            "localhost/arrow/test:latest"
        );
        for (digest, data) in &files {
            if let Some(hex) = digest
                .strip_prefix("blobs/sha256/")
                .filter(|h| !h.is_empty())
            {
                assert_eq!(sha256(data), format!("sha256:{hex}"));
            }
        }
        let config_path = format!("blobs/sha256/{}", &a.config_digest[7..]);
        let config: serde_json::Value = serde_json::from_slice(&files[&config_path]).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert_eq!(config["rootfs"]["diff_ids"][0], a.diff_id.as_str());
        assert_eq!(config["config"]["Env"][0], DEFAULT_PATH);
    }
}
