//! arrow-cri's ImageService end to end: Debian's docker-registry on
//! loopback, images built and pushed here, arrow-cri driven over its socket
//! by k8s-cri's client as crictl or kubelet would.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use support::*;
use tonic::Code;

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn base_layer(comp: Comp) -> Layer {
    layer(
        &[
            E::Dir("bin", 0o755),
            E::File("bin/tool", content(300_000, 1), 0o755),
            E::Dir("etc", 0o755),
            E::File("etc/hostname", b"arrow\n".to_vec(), 0o644),
        ],
        comp,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_and_digest_list_status_remove() {
    require_root();
    let reg = Registry::start(None);
    let base = base_layer(Comp::Gzip);
    let app = layer(
        &[
            E::Dir("app", 0o755),
            E::File("app/main", content(5000, 7), 0o755),
        ],
        Comp::Gzip,
    );
    let img = image(&[&base, &app], "1000:1000", "amd64");
    reg.push("test/app", "v1", &img).await;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    let tagged = format!("{}/test/app:v1", reg.host());
    let by_digest = format!("{}/test/app@{}", reg.host(), img.digest());

    // Unknown image: no error, no image.
    assert!(status(&mut c, &tagged, false).await.image.is_none());

    let id = pull(&mut c, &tagged, None).await.unwrap();
    assert_eq!(id, img.config_digest);
    let id2 = pull(&mut c, &by_digest, None).await.unwrap();
    assert_eq!(id2, id);

    let images = list(&mut c).await;
    assert_eq!(images.len(), 1);
    let i = &images[0];
    assert_eq!(i.id, id);
    assert_eq!(i.repo_tags, vec![tagged.clone()]);
    assert_eq!(i.repo_digests, vec![by_digest.clone()]);
    assert_eq!(i.uid.as_ref().map(|u| u.value), Some(1000));
    let expected_size: usize =
        img.blobs.iter().map(|(_, b)| b.len()).sum::<usize>() + img.top().2.len();
    assert_eq!(
        i.size, expected_size as u64,
        "manifest + config + compressed layers"
    );
    assert!(!i.pinned);

    // Status by tag, digest, id and id prefix; verbose info.
    for r in [
        tagged.as_str(),
        by_digest.as_str(),
        id.as_str(),
        &id["sha256:".len()..][..12],
    ] {
        let s = status(&mut c, r, false).await;
        assert_eq!(s.image.map(|i| i.id), Some(id.clone()), "{r}");
    }
    let s = status(&mut c, &tagged, true).await;
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["User"], "1000:1000");
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);

    // Filtered list.
    let filtered = c
        .list_images(k8s_cri::v1::ListImagesRequest {
            filter: Some(k8s_cri::v1::ImageFilter {
                image: spec(&tagged),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    let none = c
        .list_images(k8s_cri::v1::ListImagesRequest {
            filter: Some(k8s_cri::v1::ImageFilter {
                image: spec("nothing/here:v9"),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(none.is_empty());

    // The store's usage.
    let fs = c
        .image_fs_info(k8s_cri::v1::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert!(
        usage.used_bytes.as_ref().unwrap().value > 300_000,
        "the unpacked tool counts"
    );
    assert!(usage.inodes_used.as_ref().unwrap().value > 5);
    assert_eq!(layer_dirs(dir.path()), 2);

    // Unknown tag on the registry: NotFound, saying so.
    let err = pull(&mut c, &format!("{}/test/app:nope", reg.host()), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("not found"), "{}", err.message());

    // Remove by tag: every name goes, and with it the layers and blobs.
    remove(&mut c, &tagged).await.unwrap();
    assert!(status(&mut c, &id, false).await.image.is_none());
    assert!(list(&mut c).await.is_empty());
    assert_eq!(layer_dirs(dir.path()), 0);
    assert_eq!(blob_files(dir.path()), 0);
    // Idempotent.
    remove(&mut c, &tagged).await.unwrap();
    // And pullable again, then removable by id.
    pull(&mut c, &by_digest, None).await.unwrap();
    remove(&mut c, &id).await.unwrap();
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_compressions_and_shared_layers() {
    require_root();
    let reg = Registry::start(None);
    let base_gz = base_layer(Comp::Gzip);
    let base_zstd = base_layer(Comp::Zstd);
    let top_raw = layer(
        &[E::File("raw.txt", b"uncompressed layer\n".to_vec(), 0o644)],
        Comp::None,
    );
    let arm = layer(&[E::File("arch", b"arm64\n".to_vec(), 0o644)], Comp::Gzip);
    let amd_img = image(&[&base_zstd, &top_raw], "", "amd64");
    let arm_img = image(&[&arm], "", "arm64");
    let (idx, configs) = index(vec![(arm_img, "arm64"), (amd_img, "amd64")]);
    reg.push("multi/plat", "latest", &idx).await;
    // A second image sharing the base layer (gzip this time: same diff_id).
    let other_top = layer(&[E::File("other", b"other\n".to_vec(), 0o644)], Comp::Gzip);
    let other = image(&[&base_gz, &other_top], "nobody", "amd64");
    reg.push("other/img", "1", &other).await;
    // An index with no linux/amd64.
    let (arm_only, _) = index(vec![(image(&[&arm], "", "arm64"), "arm64")]);
    reg.push("arm/only", "1", &arm_only).await;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    let id = pull(&mut c, &format!("{}/multi/plat", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(id, configs[1], "linux/amd64 chosen from the index");
    let s = status(&mut c, &id, false).await.image.unwrap();
    assert_eq!(
        s.repo_tags,
        vec![format!("{}/multi/plat:latest", reg.host())]
    );
    assert_eq!(
        s.repo_digests,
        vec![format!("{}/multi/plat@{}", reg.host(), idx.digest())]
    );
    assert_eq!(layer_dirs(dir.path()), 2);

    let id2 = pull(&mut c, &format!("{}/other/img:1", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(id2, other.config_digest);
    assert_eq!(
        status(&mut c, &id2, false).await.image.unwrap().username,
        "nobody"
    );
    // base (once), top_raw, other_top.
    assert_eq!(layer_dirs(dir.path()), 3, "the shared layer is stored once");

    let err = pull(&mut c, &format!("{}/arm/only:1", reg.host()), None)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("linux/amd64") && err.message().contains("linux/arm64"),
        "{}",
        err.message()
    );

    // Removing one image keeps the shared layer for the other.
    remove(&mut c, &id).await.unwrap();
    assert_eq!(layer_dirs(dir.path()), 2);
    remove(&mut c, &id2).await.unwrap();
    assert_eq!(layer_dirs(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_opaque_dirs_metadata_restart_and_rootfs() {
    require_root();
    let reg = Registry::start(None);
    let lower = layer(
        &[
            E::Dir("etc", 0o755),
            E::File("etc/gone", b"x".to_vec(), 0o644),
            E::File("etc/kept", b"kept".to_vec(), 0o644),
            E::Dir("opaque", 0o755),
            E::File("opaque/old1", b"1".to_vec(), 0o644),
            E::File("opaque/old2", b"2".to_vec(), 0o644),
            E::Dir("gonedir", 0o755),
            E::File("gonedir/f", b"f".to_vec(), 0o644),
        ],
        Comp::Gzip,
    );
    let upper = layer(
        &[
            E::File("etc/.wh.gone", Vec::new(), 0o644),
            E::File(".wh.gonedir", Vec::new(), 0o644),
            E::Dir("opaque", 0o750),
            E::File("opaque/.wh..wh..opq", Vec::new(), 0o644),
            E::File("opaque/new", b"new".to_vec(), 0o644),
            // Parent directories the tar never names.
            E::File("deep/er/file", b"deep".to_vec(), 0o600),
            E::FileFull(
                "suid",
                b"#!".to_vec(),
                0o4755,
                1234,
                5678,
                vec![("user.arrow", b"yes")],
            ),
            E::File("hl-a", b"linked".to_vec(), 0o644),
            E::Hardlink("hl-b", "hl-a"),
            E::Symlink("abs-link", "/etc/kept".into()),
            E::Symlink("rel-link", "../../etc/kept".into()),
            E::CharDev("dev-null"),
            E::Fifo("fifo"),
        ],
        Comp::Gzip,
    );
    let img = image(&[&lower, &upper], "", "amd64");
    reg.push("tree/test", "v1", &img).await;

    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    let id = pull(&mut c, &format!("{}/tree/test:v1", reg.host()), None)
        .await
        .unwrap();
    drop(c);

    // SIGTERM: a clean exit, the socket gone.
    let status_code = daemon.stop();
    assert!(status_code.success(), "{status_code}: {}", daemon.log());
    assert!(!daemon.socket().exists());

    // A restart keeps the image.
    let mut daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    let images = list(&mut c).await;
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].id, id);
    assert_eq!(
        images[0].repo_tags,
        vec![format!("{}/tree/test:v1", reg.host())]
    );
    drop(c);
    assert!(daemon.stop().success());

    // The merged tree, through the rootfs function part 2 will use.
    let store = cri_server::store::Store::open(&Daemon::root(dir.path()), &[]).unwrap();
    let mounts = store.create_rootfs("ctr-1", &id).unwrap();
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    cri_server::store::mount_rootfs(&mounts, &target).unwrap();
    let checks = std::panic::catch_unwind(|| {
        let t = |p: &str| target.join(p);
        assert!(!t("etc/gone").exists(), "whiteout hides a lower file");
        assert_eq!(std::fs::read(t("etc/kept")).unwrap(), b"kept");
        assert!(!t("gonedir").exists(), "whiteout hides a lower directory");
        let mut names: Vec<_> = std::fs::read_dir(t("opaque"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["new"],
            "the opaque directory hides the lower entries"
        );
        assert_eq!(
            std::fs::metadata(t("opaque")).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(std::fs::read(t("deep/er/file")).unwrap(), b"deep");
        let m = std::fs::metadata(t("suid")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
        let mut value = [0u8; 16];
        let n = rustix::fs::getxattr(t("suid").as_path(), "user.arrow", &mut value[..]).unwrap();
        assert_eq!(&value[..n], b"yes");
        let a = std::fs::metadata(t("hl-a")).unwrap();
        let b = std::fs::metadata(t("hl-b")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard link kept");
        assert_eq!(
            std::fs::read_link(t("abs-link")).unwrap(),
            Path::new("/etc/kept")
        );
        assert_eq!(
            std::fs::read_link(t("rel-link")).unwrap(),
            Path::new("../../etc/kept")
        );
        assert!(!t("dev-null").exists(), "device nodes are skipped");
        assert!(std::fs::symlink_metadata(t("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like());
        assert_eq!(m.mtime(), 1_000_000);
        // The container writes to its own upper directory only.
        std::fs::write(t("etc/kept"), b"changed").unwrap();
    });
    cri_server::store::unmount_rootfs(&target).unwrap();
    checks.unwrap();
    let lower_kept = std::fs::read_dir(Daemon::root(dir.path()).join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path().join("etc/kept"))
        .find(|p| p.exists())
        .unwrap();
    assert_eq!(
        std::fs::read(lower_kept).unwrap(),
        b"kept",
        "layers stay read-only"
    );

    // In use: not removable; then released.
    let err = store.remove_image(&id).unwrap_err();
    assert!(err.to_string().contains("ctr-1"), "{err}");
    store.remove_rootfs("ctr-1").unwrap();
    assert!(!store.rootfs_dir("ctr-1").exists());
    store.remove_image(&id).unwrap();
    drop(store);
    assert_eq!(layer_dirs(dir.path()), 0);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_and_corrupted_blobs_are_refused() {
    require_root();
    let reg = Registry::start(None);
    let outside = tempfile::tempdir().unwrap();
    let outside_path: &'static str =
        Box::leak(outside.path().display().to_string().into_boxed_str());
    let escape_name: &'static str =
        Box::leak(format!("../../../../../../..{outside_path}/dotdot").into_boxed_str());
    let hostile: Vec<(&str, Vec<E>)> = vec![
        (
            "dotdot",
            vec![E::File(escape_name, b"pwned".to_vec(), 0o644)],
        ),
        (
            "dotdot2",
            vec![
                E::Dir("a", 0o755),
                E::File("a/../../escape", b"pwned".to_vec(), 0o644),
            ],
        ),
        (
            "symlink-parent",
            vec![
                E::Symlink("evil", outside_path.to_string()),
                E::File(
                    Box::leak(format!("evil/{}", "via-symlink").into_boxed_str()),
                    b"pwned".to_vec(),
                    0o644,
                ),
            ],
        ),
        (
            "symlink-dotdot",
            vec![
                E::Symlink("up", "../../../../../../../../..".into()),
                E::File(
                    Box::leak(format!("up{outside_path}/via-up").into_boxed_str()),
                    b"pwned".to_vec(),
                    0o644,
                ),
            ],
        ),
        (
            "hardlink-out",
            vec![E::Hardlink("hl", "../../../../../../../etc/passwd")],
        ),
        ("hardlink-abs", vec![E::Hardlink("hl", "/etc/passwd")]),
    ];
    for (name, entries) in &hostile {
        let l = layer(entries, Comp::Gzip);
        reg.push(&format!("hostile/{name}"), "1", &image(&[&l], "", "amd64"))
            .await;
    }
    // A good image whose layer blob the test then corrupts in the registry.
    let good = layer(&[E::File("data", content(100_000, 3), 0o644)], Comp::Gzip);
    let good_img = image(&[&good], "", "amd64");
    reg.push("good/img", "1", &good_img).await;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;
    for (name, _) in &hostile {
        let r = pull(&mut c, &format!("{}/hostile/{name}:1", reg.host()), None).await;
        if *name == "symlink-dotdot" {
            // `..` in a link target stops at the layer's root (as in
            // containerd's scoped resolution): the file lands inside.
            let id = r.unwrap();
            let inside = std::fs::read_dir(Daemon::root(dir.path()).join("layers"))
                .unwrap()
                .map(|e| {
                    e.unwrap()
                        .path()
                        .join(format!("{}/via-up", &outside_path[1..]))
                })
                .find(|p| p.exists());
            assert!(inside.is_some(), "written inside the layer");
            remove(&mut c, &id).await.unwrap();
        } else {
            // `..` refused; a link whose target is missing inside the layer
            // (an absolute one to a host directory) is no way out either.
            let err = r.expect_err(name);
            assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        }
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert!(!Path::new("/escape").exists());
    assert!(list(&mut c).await.is_empty());
    assert_eq!(
        layer_dirs(dir.path()),
        0,
        "no layer of a refused image is kept"
    );
    assert_eq!(
        std::fs::read_dir(Daemon::root(dir.path()).join("tmp"))
            .unwrap()
            .count(),
        0,
        "no partial unpack left"
    );

    // Corrupted blob: same size, other bytes.
    let blob_file = reg.blob_file(&good.digest);
    let original = std::fs::read(&blob_file).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&blob_file, &bad).unwrap();
    let name = format!("{}/good/img:1", reg.host());
    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("corrupted"), "{}", err.message());
    assert!(list(&mut c).await.is_empty());
    assert_eq!(layer_dirs(dir.path()), 0);
    // Repaired: the retry works.
    std::fs::write(&blob_file, &original).unwrap();
    assert_eq!(
        pull(&mut c, &name, None).await.unwrap(),
        good_img.config_digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_and_without_credentials() {
    require_root();
    let reg = Registry::start(Some(("arrow", "s3cret")));
    let l = layer(&[E::File("secret", b"data".to_vec(), 0o644)], Comp::Gzip);
    let img = image(&[&l], "", "amd64");
    reg.push("private/img", "1", &img).await;
    let name = format!("{}/private/img:1", reg.host());

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.images().await;

    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains(&reg.host()) && err.message().contains("credentials"),
        "{}",
        err.message()
    );

    let wrong = k8s_cri::v1::AuthConfig {
        username: "arrow".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let err = pull(&mut c, &name, Some(wrong)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let right = k8s_cri::v1::AuthConfig {
        username: "arrow".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    assert_eq!(
        pull(&mut c, &name, Some(right)).await.unwrap(),
        img.config_digest
    );
    remove(&mut c, &name).await.unwrap();

    // From the docker config.json arrow-cri reads, as `auth` (base64).
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("arrow:s3cret");
    std::fs::write(
        dir.path().join("docker-config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    assert_eq!(pull(&mut c, &name, None).await.unwrap(), img.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_name_through_a_mirror_and_concurrent_pulls() {
    require_root();
    let reg = Registry::start(None);
    let l = layer(&[E::File("hello", content(200_000, 9), 0o644)], Comp::Gzip);
    let img = image(&[&l], "", "amd64");
    reg.push("library/arrowtest", "latest", &img).await;

    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("certs.d/docker.io");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://registry-1.docker.io\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c1 = daemon.images().await;
    let mut c2 = daemon.images().await;
    // Two at once: both succeed, one download.
    let (a, b) = tokio::join!(
        pull(&mut c1, "arrowtest", None),
        pull(&mut c2, "docker.io/library/arrowtest:latest", None)
    );
    assert_eq!(a.unwrap(), img.config_digest);
    assert_eq!(b.unwrap(), img.config_digest);
    let s = status(&mut c1, "arrowtest", false).await.image.unwrap();
    assert_eq!(
        s.repo_tags,
        vec!["docker.io/library/arrowtest:latest".to_string()]
    );
    assert_eq!(
        s.repo_digests,
        vec![format!("docker.io/library/arrowtest@{}", img.digest())]
    );
    let downloads = daemon.log().matches("downloaded").count();
    assert_eq!(downloads, 1, "one download for two concurrent pulls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_service_answers_and_names_what_it_does_not_do() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut rt = daemon.runtime().await;
    let v = rt
        .version(k8s_cri::v1::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "arrow-cri");
    assert_eq!(v.runtime_api_version, "v1");
    let pods = rt
        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(pods.items.is_empty());
    // Exec, Attach and PortForward are served: an empty command is refused,
    // an unknown container or pod is not found.
    let err = rt
        .exec(k8s_cri::v1::ExecRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = rt
        .attach(k8s_cri::v1::AttachRequest {
            container_id: "nope".into(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = rt
        .port_forward(k8s_cri::v1::PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = rt
        .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Unreachable registry: Unavailable, naming it.
    let mut c = daemon.images().await;
    let err = pull(&mut c, "127.0.0.1:1/nothing/here:1", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("127.0.0.1:1") && err.message().contains("unreachable"),
        "{}",
        err.message()
    );
}

/// Bytes gzip cannot shrink (xorshift).
fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_pinned_images_and_a_full_disk() {
    require_root();
    let reg = Registry::start(None);
    let l = layer(&[E::File("pause", content(1000, 5), 0o755)], Comp::Gzip);
    let img = docker_image(&[&l], "65535");
    reg.push("pause", "3.10", &img).await;
    let big = layer(
        &[E::File("big", noise(4 << 20, 0x9e3779b97f4a7c15), 0o644)],
        Comp::Gzip,
    );
    reg.push("big/img", "1", &image(&[&big], "", "amd64")).await;
    let pause = format!("{}/pause:3.10", reg.host());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!("[registry]\nconfig_path = \"\"\ndocker_config = \"\"\n[image]\npinned_images = [\"{pause}\"]\n"),
    )
    .unwrap();
    // The store on a 2 MiB tmpfs: the 4 MiB layer cannot fit.
    let root = Daemon::root(dir.path());
    std::fs::create_dir(&root).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &root,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(c"size=2m"),
    )
    .unwrap();
    let mut daemon = Daemon::start(dir.path());
    let result = async {
        let mut c = daemon.images().await;
        let id = pull(&mut c, &pause, None).await.unwrap();
        assert_eq!(id, img.config_digest);
        let s = status(&mut c, &pause, true).await;
        let image = s.image.unwrap();
        assert!(image.pinned);
        assert_eq!(image.uid.map(|u| u.value), Some(65535));
        let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
        assert_eq!(info["manifestMediaType"], DOCKER_MANIFEST);
        let err = remove(&mut c, &pause).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("pinned"), "{}", err.message());

        let err = pull(&mut c, &format!("{}/big/img:1", reg.host()), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("no space left"), "{}", err.message());
        // Nothing of it stays; the pinned image does.
        assert_eq!(list(&mut c).await.len(), 1);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    }
    .await;
    daemon.stop();
    rustix::mount::unmount(&root, rustix::mount::UnmountFlags::DETACH).unwrap();
    result
}
