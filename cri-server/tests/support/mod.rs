//! Test support: Debian's `docker-registry` on a loopback port, images
//! built and pushed here (layers written entry by entry, hostile ones too),
//! and `arrow-cri` driven over its socket with k8s-cri's client.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

pub fn require_root() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "arrow-cri's tests run as root (they unpack layers with owners, whiteouts and overlay mounts)"
    );
}

pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- registry

pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// Starts `docker-registry` on 127.0.0.1, with htpasswd auth when
    /// `credentials` are given.
    pub fn start(credentials: Option<(&str, &str)>) -> Registry {
        let bin = "/usr/bin/docker-registry";
        assert!(
            Path::new(bin).exists(),
            "{bin} missing: hack/deps.sh installs Debian's docker-registry"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut auth = String::new();
        if let Some((user, password)) = credentials {
            let hash = bcrypt::hash(password, 4).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: arrow-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        for _attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(bin)
                .arg("serve")
                .arg(&config_path)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Registry {
                        dir,
                        port,
                        child,
                        credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The file the registry serves blob `digest` from.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let auth = match &self.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    /// Pushes `image` as `repository:tag` (and returns it back).
    pub async fn push(&self, repository: &str, tag: &str, image: &Pushable) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (client, auth) = self.client();
        let reference = Reference::with_tag(self.host(), repository.to_string(), tag.to_string());
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .unwrap();
        for (digest, data) in &image.blobs {
            client
                .push_blob(&reference, data.clone(), digest)
                .await
                .unwrap();
        }
        for (digest, media_type, body) in &image.manifests {
            let by_digest =
                Reference::with_digest(self.host(), repository.to_string(), digest.clone());
            client
                .push_manifest_raw(&by_digest, body.clone(), media_type.parse().unwrap())
                .await
                .unwrap();
        }
        let (_, media_type, body) = image.top();
        client
            .push_manifest_raw(&reference, body.clone(), media_type.parse().unwrap())
            .await
            .unwrap();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ layers

/// One tar entry. Names are written into the header as they are, `..` and
/// all, so hostile layers can be made.
#[derive(Clone)]
pub enum E {
    Dir(&'static str, u32),
    File(&'static str, Vec<u8>, u32),
    /// path, content, mode, uid, gid, xattrs
    FileFull(
        &'static str,
        Vec<u8>,
        u32,
        u64,
        u64,
        Vec<(&'static str, &'static [u8])>,
    ),
    Symlink(&'static str, String),
    Hardlink(&'static str, &'static str),
    CharDev(&'static str),
    Fifo(&'static str),
}

fn header(
    kind: tar::EntryType,
    name: &str,
    link: &str,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    {
        let ustar = h.as_ustar_mut().unwrap();
        assert!(name.len() <= 100 && link.len() <= 100);
        ustar.name = [0; 100];
        ustar.name[..name.len()].copy_from_slice(name.as_bytes());
        ustar.linkname = [0; 100];
        ustar.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_000_000);
    h.set_cksum();
    h
}

fn pax(builder: &mut tar::Builder<Vec<u8>>, records: &[(String, Vec<u8>)]) {
    let mut data = Vec::new();
    for (k, v) in records {
        // "LEN key=value\n", LEN counting itself.
        let rest = k.len() + v.len() + 3;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let h = header(
        tar::EntryType::XHeader,
        "PaxHeaders/x",
        "",
        0o644,
        0,
        0,
        data.len() as u64,
    );
    builder.append(&h, &data[..]).unwrap();
}

pub fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(p, mode) => b
                .append(
                    &header(tar::EntryType::Directory, p, "", *mode, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::File(p, data, mode) => b
                .append(
                    &header(
                        tar::EntryType::Regular,
                        p,
                        "",
                        *mode,
                        0,
                        0,
                        data.len() as u64,
                    ),
                    &data[..],
                )
                .unwrap(),
            E::FileFull(p, data, mode, uid, gid, xattrs) => {
                if !xattrs.is_empty() {
                    let recs: Vec<(String, Vec<u8>)> = xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.to_vec()))
                        .collect();
                    pax(&mut b, &recs);
                }
                b.append(
                    &header(
                        tar::EntryType::Regular,
                        p,
                        "",
                        *mode,
                        *uid,
                        *gid,
                        data.len() as u64,
                    ),
                    &data[..],
                )
                .unwrap()
            }
            E::Symlink(p, target) => b
                .append(
                    &header(tar::EntryType::Symlink, p, target, 0o777, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::Hardlink(p, target) => b
                .append(
                    &header(tar::EntryType::Link, p, target, 0o644, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::CharDev(p) => b
                .append(
                    &header(tar::EntryType::Char, p, "", 0o666, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::Fifo(p) => b
                .append(
                    &header(tar::EntryType::Fifo, p, "", 0o640, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
        }
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: &'static str,
}

pub fn layer(entries: &[E], comp: Comp) -> Layer {
    let tar = layer_tar(entries);
    let diff_id = sha256(&tar);
    let (blob, media_type) = match comp {
        Comp::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&tar).unwrap();
            (
                enc.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(&tar[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    Layer {
        digest: sha256(&blob),
        blob,
        diff_id,
        media_type,
    }
}

/// Blobs and manifests to push; the last manifest is what the tag names.
pub struct Pushable {
    pub blobs: Vec<(String, Vec<u8>)>,
    pub manifests: Vec<(String, String, Vec<u8>)>,
    pub config_digest: String,
}

impl Pushable {
    pub fn top(&self) -> &(String, String, Vec<u8>) {
        self.manifests.last().unwrap()
    }
    pub fn digest(&self) -> &str {
        &self.top().0
    }
}

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// An image of `layers` for `os/arch`, with `user` in its config.
pub fn image(layers: &[&Layer], user: &str, arch: &str) -> Pushable {
    image_as(layers, user, arch, false)
}

/// The same as a Docker schema 2 image (Docker's media types throughout).
pub fn docker_image(layers: &[&Layer], user: &str) -> Pushable {
    image_as(layers, user, "amd64", true)
}

fn image_as(layers: &[&Layer], user: &str, arch: &str, docker: bool) -> Pushable {
    let (manifest_type, config_type) = if docker {
        (
            DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
        )
    } else {
        (OCI_MANIFEST, OCI_CONFIG)
    };
    let layer_type = |l: &Layer| -> &'static str {
        match (docker, l.media_type) {
            (true, "application/vnd.oci.image.layer.v1.tar+gzip") => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (true, "application/vnd.oci.image.layer.v1.tar") => {
                "application/vnd.docker.image.rootfs.diff.tar"
            }
            (_, t) => t,
        }
    };
    let config = json!({
        "architecture": arch, "os": "linux",
        "config": { "User": user, "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": { "mediaType": config_type, "digest": config_digest, "size": config.len() },
        "layers": layers.iter().map(|l| json!({"mediaType": layer_type(l), "digest": l.digest, "size": l.blob.len()})).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut blobs: Vec<(String, Vec<u8>)> = layers
        .iter()
        .map(|l| (l.digest.clone(), l.blob.clone()))
        .collect();
    blobs.push((config_digest.clone(), config));
    Pushable {
        blobs,
        manifests: vec![(sha256(&manifest), manifest_type.to_string(), manifest)],
        config_digest,
    }
}

/// An index of `images` with their platforms.
pub fn index(images: Vec<(Pushable, &str)>) -> (Pushable, Vec<String>) {
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    let mut entries = Vec::new();
    let mut configs = Vec::new();
    for (img, arch) in images {
        let (digest, mt, body) = img.top().clone();
        entries.push(
            json!({"mediaType": mt, "digest": digest, "size": body.len(),
            "platform": {"architecture": arch, "os": "linux"}}),
        );
        configs.push(img.config_digest.clone());
        blobs.extend(img.blobs);
        manifests.push((digest, mt, body));
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    .unwrap();
    manifests.push((sha256(&index), OCI_INDEX.to_string(), index));
    (
        Pushable {
            blobs,
            manifests,
            config_digest: String::new(),
        },
        configs,
    )
}

// ----------------------------------------------------------------- daemon

pub struct Daemon {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn root(dir: &Path) -> PathBuf {
        dir.join("root")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("cri.sock")
    }

    /// Starts `arrow-cri` with everything under `dir` (its config is
    /// `dir/config.toml`, written by the caller or defaulted here).
    pub fn start(dir: &Path) -> Daemon {
        let config = dir.join("config.toml");
        if !config.exists() {
            std::fs::write(
                &config,
                format!(
                    "[registry]\nconfig_path = \"{}\"\ndocker_config = \"{}\"\n[image]\npinned_images = []\n",
                    dir.join("certs.d").display(),
                    dir.join("docker-config.json").display()
                ),
            )
            .unwrap();
        }
        let socket = dir.join("cri.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("arrow-cri.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_arrow-cri"))
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--listen")
            .arg(&socket)
            .arg("--log-level")
            .arg("debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = d.child.as_mut().unwrap().try_wait() {
                panic!("arrow-cri exited ({status}): {}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "arrow-cri did not listen: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("arrow-cri.log")).unwrap_or_default()
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with integer arguments, on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("arrow-cri did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub async fn channel(&self) -> Channel {
        let path = self.socket();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------- CRI helpers

pub fn spec(image: &str) -> Option<k8s_cri::v1::ImageSpec> {
    Some(k8s_cri::v1::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

pub async fn pull(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<k8s_cri::v1::AuthConfig>,
) -> Result<String, tonic::Status> {
    client
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

pub async fn status(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
    verbose: bool,
) -> k8s_cri::v1::ImageStatusResponse {
    client
        .image_status(k8s_cri::v1::ImageStatusRequest {
            image: spec(image),
            verbose,
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn list(client: &mut ImageServiceClient<Channel>) -> Vec<k8s_cri::v1::Image> {
    client
        .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images
}

pub async fn remove(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
) -> Result<(), tonic::Status> {
    client
        .remove_image(k8s_cri::v1::RemoveImageRequest { image: spec(image) })
        .await
        .map(|_| ())
}

/// Directories under `root/layers` (unpacked layers).
pub fn layer_dirs(dir: &Path) -> usize {
    std::fs::read_dir(Daemon::root(dir).join("layers"))
        .map(|r| r.count())
        .unwrap_or(0)
}

pub fn blob_files(dir: &Path) -> usize {
    std::fs::read_dir(Daemon::root(dir).join("blobs/sha256"))
        .map(|r| r.count())
        .unwrap_or(0)
}
