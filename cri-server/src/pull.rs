//! Pulling an image from an OCI distribution registry into the store.
//!
//! Resolve the reference on the first endpoint that answers (hosts.toml
//! mirrors, then the registry itself), take linux/amd64 from an index, fetch
//! the config, then every missing layer — downloaded (digest and size
//! checked), unpacked (diff_id checked) and recorded, several at a time —
//! and only then record the image. Nothing of a failed pull is visible: its
//! complete blobs and layers stay for a retry until garbage collection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::hosts::{self, Endpoint};
use crate::reference::{is_digest, ImageRef};
use crate::store::{ImageRecord, LayerDesc, Store};
use crate::unpack;

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const ACCEPT: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
];
/// Manifests and configs are read whole: bound them.
const MAX_JSON: usize = 8 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize, Clone)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOrIndex {
    #[serde(default)]
    schema_version: i64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
struct ImageConfigJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RunConfig {
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub struct Puller {
    store: Arc<Store>,
    config: RegistryConfig,
}

/// One endpoint, ready to talk to.
struct Session {
    client: Client,
    reference: oci_client::Reference,
    endpoint: Endpoint,
    auth: RegistryAuth,
}

impl Puller {
    pub fn new(store: Arc<Store>, config: RegistryConfig) -> Puller {
        // reqwest is built without a default crypto provider: ring's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Puller { store, config }
    }

    /// Pulls `reference` (any form kubelet or crictl sends) and returns the
    /// stored image. `auth` comes from the CRI request, if it had one.
    pub async fn pull(&self, reference: &str, auth: Option<RegistryAuth>) -> Result<ImageRecord> {
        let image = ImageRef::parse(reference).map_err(Error::InvalidArgument)?;
        let started = Instant::now();
        // Concurrent pulls of one reference: one does the work, the others
        // then find every blob and layer in place.
        let lock = self.store.inflight(&format!("pull:{image}"));
        let _one = lock.lock().await;
        let _gc = self.store.gc_lock.read().await;
        let record = self.pull_locked(&image, auth).await?;
        tracing::info!(image = %image, id = %record.id, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
        Ok(record)
    }

    async fn pull_locked(
        &self,
        image: &ImageRef,
        auth: Option<RegistryAuth>,
    ) -> Result<ImageRecord> {
        let endpoints =
            hosts::endpoints(&self.config.config_path, &image.registry).map_err(|e| {
                Error::InvalidArgument(format!(
                    "registry configuration for {}: {e:#}",
                    image.registry
                ))
            })?;
        // Resolve on the first endpoint that answers.
        let mut last_err = None;
        let mut resolved = None;
        for endpoint in endpoints {
            let session = self.session(image, &endpoint, auth.clone())?;
            match self
                .fetch_manifest(&session, image, &session.reference)
                .await
            {
                Ok(m) => {
                    resolved = Some((session, m));
                    break;
                }
                Err(e) => {
                    tracing::info!(image = %image, host = %endpoint.host, error = %e, "resolving failed on this host");
                    last_err = Some(e);
                }
            }
        }
        let (session, (top_body, top_digest)) = match resolved {
            Some(r) => r,
            None => {
                return Err(
                    last_err.unwrap_or_else(|| Error::Internal("no registry endpoint".into()))
                )
            }
        };
        let top: ManifestOrIndex = parse_json(&top_body, image, "manifest")?;
        let top_type = media_type(&top);
        let (index, manifest_body, manifest_digest, manifest) = if top.manifests.is_some() {
            let chosen = choose_platform(&top, image)?;
            let r = session.reference.clone_with_digest(chosen.clone());
            let (body, digest) = self.fetch_manifest(&session, image, &r).await?;
            let m: ManifestOrIndex = parse_json(&body, image, "manifest")?;
            if m.manifests.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{image}: the index entry for linux/amd64 is itself an index; nested indexes are not supported"
                )));
            }
            (Some((top_digest.clone(), top_body)), body, digest, m)
        } else {
            (None, top_body, top_digest.clone(), top)
        };
        let index_digest = index.as_ref().map(|(d, _)| d.clone());
        let manifest_type = media_type(&manifest);
        if manifest.schema_version == 1 || manifest_type == MEDIA_DOCKER_SCHEMA1 {
            return Err(Error::InvalidArgument(format!(
                "{image}: Docker schema 1 manifests are not supported (re-push the image with a current Docker or skopeo)"
            )));
        }
        let (Some(config_desc), Some(layer_descs)) = (&manifest.config, &manifest.layers) else {
            return Err(Error::InvalidArgument(format!(
                "{image}: manifest {manifest_digest} ({manifest_type}) has no config or layers: not an image"
            )));
        };
        check_descriptor(config_desc, image)?;
        let config_body = self.fetch_small_blob(&session, image, config_desc).await?;
        let config: ImageConfigJson = parse_json(&config_body, image, "image config")?;
        if index_digest.is_none() && (config.os != "linux" || config.architecture != "amd64") {
            return Err(Error::InvalidArgument(format!(
                "{image} is for {}/{}, not linux/amd64: pull a tag or digest built for linux/amd64",
                config.os, config.architecture
            )));
        }
        if config.rootfs.diff_ids.len() != layer_descs.len() {
            return Err(Error::InvalidArgument(format!(
                "{image}: the manifest has {} layers but the config {} diff_ids",
                layer_descs.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (desc, diff_id) in layer_descs.iter().zip(&config.rootfs.diff_ids) {
            check_descriptor(desc, image)?;
            if !is_digest(diff_id) {
                return Err(Error::InvalidArgument(format!(
                    "{image}: diff_id {diff_id:?} is not a sha256 digest"
                )));
            }
            if desc.urls.as_ref().is_some_and(|u| !u.is_empty())
                || desc.media_type.contains("nondistributable")
                || desc.media_type.contains("foreign")
            {
                return Err(Error::InvalidArgument(format!(
                    "{image}: layer {} is a foreign (non-distributable) layer, which arrow-cri does not fetch",
                    desc.digest
                )));
            }
            if !is_layer_type(&desc.media_type) {
                return Err(Error::InvalidArgument(format!(
                    "{image}: layer {} has media type {:?}, not an image layer (tar, tar+gzip, tar+zstd)",
                    desc.digest, desc.media_type
                )));
            }
            layers.push(LayerDesc {
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
                size: desc.size as u64,
                diff_id: diff_id.clone(),
            });
        }

        // The layers, several at a time.
        let limit = self.config.max_concurrent_downloads.max(1);
        let session = Arc::new(session);
        futures_util::stream::iter(layers.iter().cloned().map(|layer| {
            let session = session.clone();
            async move { self.ensure_layer(&session, image, &layer).await }
        }))
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await?;

        // Then the small blobs and the record.
        if let Some((digest, body)) = &index {
            self.store.write_blob(digest, body)?;
        }
        self.store.write_blob(&manifest_digest, &manifest_body)?;
        self.store.write_blob(&config_desc.digest, &config_body)?;
        let size = manifest_body.len() as u64
            + config_body.len() as u64
            + layers.iter().map(|l| l.size).sum::<u64>();
        let record = ImageRecord {
            id: config_desc.digest.clone(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            manifest_digest: manifest_digest.clone(),
            manifest_media_type: manifest_type,
            index_digest: index_digest.clone(),
            layers,
            size,
            user: config.config.and_then(|c| c.user).unwrap_or_default(),
            pulled_at: 0,
        };
        let tag = if image.digest.is_none() {
            image.tagged()
        } else {
            None
        };
        let repo_digest = image.with_digest(&top_digest);
        tracing::debug!(image = %image, top_type, "committing");
        self.store.commit_image(record, tag, repo_digest)
    }

    fn session(
        &self,
        image: &ImageRef,
        endpoint: &Endpoint,
        auth: Option<RegistryAuth>,
    ) -> Result<Session> {
        let mut extra = Vec::new();
        for ca in &endpoint.ca {
            let data = std::fs::read(ca).map_err(|e| {
                Error::InvalidArgument(format!(
                    "CA file {} for {}: {e}",
                    ca.display(),
                    endpoint.host
                ))
            })?;
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if endpoint.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: endpoint.skip_verify,
            extra_root_certificates: extra,
            platform_resolver: None,
            max_concurrent_download: self.config.max_concurrent_downloads.max(1),
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            user_agent: concat!("arrow-cri/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let mut reference = image.oci();
        if endpoint.mirror
            || (image.registry != endpoint.host
                && !(image.registry == "docker.io" && endpoint.host == "registry-1.docker.io"))
        {
            reference.set_mirror_registry(endpoint.host.clone());
        }
        let auth = auth
            .or_else(|| {
                auth_from_docker_config(&self.config.docker_config, &endpoint.host, &image.registry)
            })
            .unwrap_or(RegistryAuth::Anonymous);
        Ok(Session {
            client: Client::new(config),
            reference,
            endpoint: endpoint.clone(),
            auth,
        })
    }

    /// A manifest or index by tag or digest, its digest checked.
    async fn fetch_manifest(
        &self,
        session: &Session,
        image: &ImageRef,
        reference: &oci_client::Reference,
    ) -> Result<(bytes::Bytes, String)> {
        // The client keeps the credentials for its later blob requests.
        let (body, _) = session
            .client
            .pull_manifest_raw(reference, &session.auth, ACCEPT)
            .await
            .map_err(|e| registry_error(e, image, &session.endpoint))?;
        if body.len() > MAX_JSON {
            return Err(Error::InvalidArgument(format!(
                "{image}: manifest larger than {MAX_JSON} bytes"
            )));
        }
        let digest = sha256(&body);
        if let Some(want) = reference.digest() {
            if digest != want {
                return Err(Error::DataLoss(format!(
                    "{image}: registry {} sent a manifest whose digest is {digest}, not the {want} asked for: the registry's content is corrupted",
                    session.endpoint.host
                )));
            }
        }
        Ok((body, digest))
    }

    async fn fetch_small_blob(
        &self,
        session: &Session,
        image: &ImageRef,
        desc: &Descriptor,
    ) -> Result<Vec<u8>> {
        if desc.size < 0 || desc.size as usize > MAX_JSON {
            return Err(Error::InvalidArgument(format!(
                "{image}: config {} of {} bytes is out of bounds",
                desc.digest, desc.size
            )));
        }
        if self.store.has_blob(&desc.digest) {
            return self.store.read_blob(&desc.digest);
        }
        let mut out = Vec::with_capacity(desc.size as usize);
        let mut stream = session
            .client
            .pull_blob_stream(&session.reference, desc.digest.as_str())
            .await
            .map_err(|e| registry_error(e, image, &session.endpoint))?;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| blob_stream_error(e, image, &session.endpoint, &desc.digest))?;
            if out.len() + chunk.len() > desc.size as usize {
                return Err(size_error(
                    image,
                    &session.endpoint,
                    &desc.digest,
                    desc.size as u64,
                ));
            }
            out.extend_from_slice(&chunk);
        }
        if sha256(&out) != desc.digest {
            return Err(digest_error(image, &session.endpoint, &desc.digest));
        }
        Ok(out)
    }

    /// The layer unpacked in the store: downloaded and unpacked unless it
    /// is there already (from any image).
    async fn ensure_layer(
        &self,
        session: &Session,
        image: &ImageRef,
        layer: &LayerDesc,
    ) -> Result<()> {
        if self.store.layer(&layer.diff_id).is_some() {
            return Ok(());
        }
        let lock = self.store.inflight(&format!("layer:{}", layer.diff_id));
        let _guard = lock.lock().await;
        if self.store.layer(&layer.diff_id).is_some() {
            return Ok(());
        }
        if !self.store.has_blob(&layer.digest) {
            let started = Instant::now();
            self.download(session, image, layer).await?;
            tracing::debug!(layer = %layer.digest, bytes = layer.size, ms = started.elapsed().as_millis() as u64, "downloaded");
        }
        let store = self.store.clone();
        let layer = layer.clone();
        let image_name = image.to_string();
        tokio::task::spawn_blocking(move || unpack_into_store(&store, &image_name, &layer))
            .await
            .map_err(|e| Error::Internal(format!("unpack task: {e}")))?
    }

    async fn download(&self, session: &Session, image: &ImageRef, layer: &LayerDesc) -> Result<()> {
        let tmp = self.store.tmp_path("blob");
        let result = self.download_to(session, image, layer, &tmp).await;
        match result {
            Ok(()) => self.store.commit_blob(&tmp, &layer.digest),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    async fn download_to(
        &self,
        session: &Session,
        image: &ImageRef,
        layer: &LayerDesc,
        tmp: &PathBuf,
    ) -> Result<()> {
        let root = self.store.root().to_path_buf();
        let file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| Error::io("creating a download file", &root, &e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut stream = session
            .client
            .pull_blob_stream(&session.reference, layer.digest.as_str())
            .await
            .map_err(|e| registry_error(e, image, &session.endpoint))?;
        let mut got = 0u64;
        // oci-client's stream checks the digest at its end (an error item).
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| blob_stream_error(e, image, &session.endpoint, &layer.digest))?;
            got += chunk.len() as u64;
            if got > layer.size {
                return Err(size_error(
                    image,
                    &session.endpoint,
                    &layer.digest,
                    layer.size,
                ));
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| Error::io(format!("writing layer {}", layer.digest), &root, &e))?;
        }
        if got != layer.size {
            return Err(size_error(
                image,
                &session.endpoint,
                &layer.digest,
                layer.size,
            ));
        }
        out.flush()
            .await
            .map_err(|e| Error::io(format!("writing layer {}", layer.digest), &root, &e))?;
        Ok(())
    }
}

/// Unpacks a stored layer blob into a fresh directory, checks its diff_id
/// and moves it into the store.
fn unpack_into_store(store: &Store, image: &str, layer: &LayerDesc) -> Result<()> {
    let root = store.root().to_path_buf();
    let started = Instant::now();
    let blob = std::fs::File::open(store.blob_path(&layer.digest))
        .map_err(|e| Error::io(format!("opening layer {}", layer.digest), &root, &e))?;
    let dir = store.tmp_path("layer");
    std::fs::create_dir(&dir).map_err(|e| Error::io("creating a layer directory", &root, &e))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| Error::io("creating a layer directory", &root, &e))?;
    let result = unpack::unpack_layer(blob, &dir);
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            let _ = unpack::remove_tree(&dir);
            return Err(match &e {
                unpack::UnpackError::Refused { .. } => Error::InvalidArgument(format!(
                    "{image}: layer {} refused: {e}. The image is malformed or hostile; nothing of it was kept",
                    layer.digest
                )),
                _ => match e.io_error() {
                    Some(io) if crate::error::is_disk_full(io) => {
                        Error::io(format!("{image}: unpacking layer {}", layer.digest), &root, io)
                    }
                    _ => Error::InvalidArgument(format!(
                        "{image}: layer {} could not be unpacked: {e}",
                        layer.digest
                    )),
                },
            });
        }
    };
    if stats.diff_id != layer.diff_id {
        let _ = unpack::remove_tree(&dir);
        // The blob matched its digest, so it is what the manifest names:
        // the image itself is inconsistent. Drop the blob too.
        let _ = std::fs::remove_file(store.blob_path(&layer.digest));
        return Err(Error::DataLoss(format!(
            "{image}: layer {} unpacks to {}, but the image config says {}: the image is corrupted",
            layer.digest, stats.diff_id, layer.diff_id
        )));
    }
    // On disk before the metadata names it: a power cut must not leave a
    // recorded layer half written (one syncfs covers its blob too).
    let sync = std::fs::File::open(&dir).and_then(|f| rustix::fs::syncfs(&f).map_err(Into::into));
    if let Err(e) = sync {
        let _ = unpack::remove_tree(&dir);
        return Err(Error::io(
            format!("{image}: syncing layer {}", layer.digest),
            &root,
            &e,
        ));
    }
    store.commit_layer(&dir, &layer.diff_id, stats.bytes)?;
    tracing::debug!(
        layer = %layer.digest,
        diff_id = %layer.diff_id,
        entries = stats.entries,
        bytes = stats.bytes,
        ms = started.elapsed().as_millis() as u64,
        "unpacked"
    );
    Ok(())
}

fn auth_from_docker_config(
    path: &std::path::Path,
    host: &str,
    registry: &str,
) -> Option<RegistryAuth> {
    crate::auth::from_docker_config(path, host, registry)
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", unpack::hex(&Sha256::digest(data)))
}

fn media_type(m: &ManifestOrIndex) -> String {
    match &m.media_type {
        Some(t) => t.clone(),
        None if m.manifests.is_some() => MEDIA_OCI_INDEX.into(),
        None => MEDIA_OCI_MANIFEST.into(),
    }
}

fn is_layer_type(t: &str) -> bool {
    matches!(
        t,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
    )
}

fn check_descriptor(d: &Descriptor, image: &ImageRef) -> Result<()> {
    if !is_digest(&d.digest) {
        return Err(Error::InvalidArgument(format!(
            "{image}: descriptor digest {:?} is not sha256:<64 hex> (only sha256 is supported)",
            d.digest
        )));
    }
    if d.size < 0 {
        return Err(Error::InvalidArgument(format!(
            "{image}: descriptor {} has a negative size",
            d.digest
        )));
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    image: &ImageRef,
    what: &str,
) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::InvalidArgument(format!("{image}: the {what} is not valid: {e}")))
}

/// linux/amd64 from an index (an entry without a variant, or `v1`, first).
fn choose_platform(index: &ManifestOrIndex, image: &ImageRef) -> Result<String> {
    let entries = index.manifests.as_deref().unwrap_or_default();
    let mut best: Option<&Descriptor> = None;
    for d in entries {
        let Some(p) = &d.platform else { continue };
        if p.os == "linux" && p.architecture == "amd64" {
            let plain = p
                .variant
                .as_deref()
                .is_none_or(|v| v == "v1" || v.is_empty());
            if best.is_none() || plain {
                best = Some(d);
                if plain {
                    break;
                }
            }
        }
    }
    match best {
        Some(d) => {
            if !is_digest(&d.digest) {
                return Err(Error::InvalidArgument(format!(
                    "{image}: index entry digest {:?} is not sha256",
                    d.digest
                )));
            }
            Ok(d.digest.clone())
        }
        None => {
            let platforms: Vec<String> = entries
                .iter()
                .filter_map(|d| d.platform.clone())
                .map(|p| match p.variant {
                    Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
                    _ => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(Error::NotFound(format!(
                "{image} has no manifest for linux/amd64 (it has: {}): use an image built for linux/amd64",
                if platforms.is_empty() { "none named".to_string() } else { platforms.join(", ") }
            )))
        }
    }
}

fn size_error(image: &ImageRef, ep: &Endpoint, digest: &str, size: u64) -> Error {
    Error::DataLoss(format!(
        "{image}: registry {} sent blob {digest} with a size other than the {size} bytes the manifest says: the registry's copy is corrupted; nothing was kept",
        ep.host
    ))
}

fn digest_error(image: &ImageRef, ep: &Endpoint, digest: &str) -> Error {
    Error::DataLoss(format!(
        "{image}: registry {} sent blob {digest} whose content does not match its digest: the registry's copy is corrupted (or something altered it in transit); nothing was kept",
        ep.host
    ))
}

fn blob_stream_error(e: std::io::Error, image: &ImageRef, ep: &Endpoint, digest: &str) -> Error {
    let text = e.to_string();
    if text.contains("Invalid digest") {
        return digest_error(image, ep, digest);
    }
    Error::Unavailable(format!(
        "{image}: downloading blob {digest} from {} failed: {text}; retry the pull",
        ep.host
    ))
}

/// A registry error as the user should read it.
fn registry_error(e: OciDistributionError, image: &ImageRef, ep: &Endpoint) -> Error {
    let host = &ep.host;
    let scheme = if ep.plain_http { "http" } else { "https" };
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            Error::Unauthenticated(format!(
                "registry {host} refused access to {image} (401 Unauthorized): pass credentials (kubelet image pull secret, crictl pull --creds USER:PASSWORD, or an auths entry in the docker config.json arrow-cri reads) or check them"
            ))
        }
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<String> = envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
            let text = codes.join("; ");
            if text.contains("Unauthorized") || text.contains("Denied") {
                Error::PermissionDenied(format!(
                    "registry {host} denied {image} ({text}): check the credentials and the repository's permissions"
                ))
            } else if text.contains("Unknown") || text.contains("NotFound") || text.contains("not found") {
                Error::NotFound(format!(
                    "{image} was not found on registry {host} ({text}): check the name and tag ({url})"
                ))
            } else {
                Error::Unavailable(format!("registry {host} refused {image}: {text} ({url})"))
            }
        }
        OciDistributionError::ServerError { code: 404, url, .. } => Error::NotFound(format!(
            "{image} was not found on registry {host} (404 for {url}): check the name and tag"
        )),
        OciDistributionError::ServerError { code: 401, .. } => Error::Unauthenticated(format!(
            "registry {host} refused access to {image} (401): pass or check credentials"
        )),
        OciDistributionError::ServerError { code: 403, .. } => Error::PermissionDenied(format!(
            "registry {host} denied {image} (403): check the credentials and the repository's permissions"
        )),
        OciDistributionError::ServerError { code, url, message } => Error::Unavailable(format!(
            "registry {host} answered {code} for {url} ({}): retry later or check the registry",
            message.chars().take(200).collect::<String>()
        )),
        OciDistributionError::RequestError(err) => {
            let mut detail = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                detail.push_str(": ");
                detail.push_str(&s.to_string());
                source = s.source();
            }
            Error::Unavailable(format!(
                "registry {host} is unreachable over {scheme} for {image} ({detail}): check the network, the name, and for a plain-HTTP or self-signed registry its hosts.toml"
            ))
        }
        other => Error::Unavailable(format!("pulling {image} from {host}: {other}")),
    }
}
