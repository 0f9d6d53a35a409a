//! The daemon: the store, the CRI services on a Unix socket, shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::image_service::Images;
use crate::pull::Puller;
use crate::runtime::{cni::Cni, Runtime as Engine, RuntimeOptions};
use crate::runtime_service::Runtime;
use crate::store::Store;
use crate::streaming::StreamingServer;

/// gRPC messages up to 16 MiB (kubelet's own limit).
const MAX_MESSAGE: usize = 16 << 20;

/// Binds the socket: a stale one (nobody answering) is replaced, a live one
/// is an error.
async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is already served by another process (another arrow-cri?): give this one its own --listen",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    std::fs::create_dir_all(&config.state)
        .with_context(|| format!("creating the state directory {}", config.state.display()))?;
    let root = config.root.clone();
    let pinned = config.image.pinned_images.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&root, &pinned)).await??;
    let store = Arc::new(store);
    let images = Images::new(
        store.clone(),
        Puller::new(store.clone(), config.registry.clone()),
    );
    let listener = bind(&config.listen).await?;
    let engine = Engine::start(
        store.clone(),
        RuntimeOptions {
            state_dir: config.state.clone(),
            shim: config.runtime.shim.clone(),
            listen: config.listen.clone(),
            cni: Cni {
                conf_dir: config.cni.conf_dir.clone(),
                bin_dir: config.cni.bin_dir.clone(),
            },
        },
    )
    .await
    .context("starting the runtime")?;
    let streaming = Arc::new(
        StreamingServer::start(&config.stream_address, engine.clone())
            .await
            .context("starting the streaming server")?,
    );
    let pods = engine.pods().await.len();
    tracing::info!(
        listen = %config.listen.display(),
        root = %config.root.display(),
        state = %config.state.display(),
        images = store.images().len(),
        pods,
        "arrow-cri serving CRI ImageService and RuntimeService"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let result = tonic::transport::Server::builder()
        .add_service(
            ImageServiceServer::new(images)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            RuntimeServiceServer::new(Runtime::new(engine, streaming))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&config.listen);
    result.context("serving CRI")?;
    tracing::info!("arrow-cri stopped");
    Ok(())
}
