//! CRI `runtime.v1.ImageService` on the store.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest, ImageFsInfoResponse,
    ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value, ListImagesRequest,
    ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pull::Puller;
use crate::store::{ImageRecord, Store};

pub struct Images {
    store: Arc<Store>,
    puller: Puller,
}

impl Images {
    pub fn new(store: Arc<Store>, puller: Puller) -> Images {
        Images { store, puller }
    }

    fn to_cri(&self, image: &ImageRecord) -> Image {
        let (uid, username) = user_of(&image.user);
        Image {
            id: image.id.clone(),
            repo_tags: image.repo_tags.clone(),
            repo_digests: image.repo_digests.clone(),
            size: image.size,
            uid: uid.map(|value| Int64Value { value }),
            username,
            spec: Some(ImageSpec {
                image: image.id.clone(),
                ..Default::default()
            }),
            pinned: self.store.is_pinned(image),
        }
    }
}

/// The image config's `User` as CRI wants it: a uid when it is numeric
/// (`1000`, `1000:1000`), else the user name (`nobody`, `nobody:nogroup`).
pub fn user_of(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or("");
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

fn spec_image(spec: &Option<ImageSpec>) -> Result<&str, Status> {
    match spec {
        Some(s) if !s.image.trim().is_empty() => Ok(s.image.trim()),
        _ => Err(Status::invalid_argument(
            "no image given (ImageSpec.image is empty)",
        )),
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(f) => self.store.find(&f).into_iter().collect(),
            None => self.store.images(),
        };
        Ok(Response::new(ListImagesResponse {
            images: images.iter().map(|i| self.to_cri(i)).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let reference = spec_image(&request.image)?;
        // CRI: an unknown image is no error, just no image.
        let Some(image) = self.store.find(reference) else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if request.verbose {
            let config: serde_json::Value = self
                .store
                .read_blob(image.config_digest())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            let layers: Vec<_> = image
                .layers
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "digest": l.digest, "mediaType": l.media_type, "size": l.size,
                        "diffID": l.diff_id,
                        "unpackedBytes": self.store.layer(&l.diff_id).map(|r| r.unpacked_bytes),
                    })
                })
                .collect();
            let value = serde_json::json!({
                "imageSpec": config,
                "manifestDigest": image.manifest_digest,
                "manifestMediaType": image.manifest_media_type,
                "indexDigest": image.index_digest,
                "layers": layers,
                "pulledAt": image.pulled_at,
                "usedBy": self.store.users(&image.id),
            });
            info.insert("info".to_string(), value.to_string());
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(self.to_cri(&image)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let reference = spec_image(&request.image)?.to_string();
        let auth = match &request.auth {
            Some(a) => crate::auth::from_cri(a).map_err(Status::invalid_argument)?,
            None => None,
        };
        tracing::info!(image = %reference, with_credentials = auth.is_some(), "PullImage");
        match self.puller.pull(&reference, auth).await {
            Ok(image) => Ok(Response::new(PullImageResponse {
                image_ref: image.id,
            })),
            Err(e) => {
                tracing::warn!(image = %reference, error = %e, "PullImage failed");
                Err(e.into())
            }
        }
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let reference = spec_image(&request.image)?.to_string();
        let store = self.store.clone();
        let _gc = self.store.gc_lock.write().await;
        let removed = tokio::task::spawn_blocking(move || store.remove_image(&reference))
            .await
            .map_err(|e| Status::internal(format!("remove task: {e}")))?
            .map_err(Status::from)?;
        if let Some(image) = removed {
            tracing::info!(id = %image.id, tags = ?image.repo_tags, "RemoveImage");
        }
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let store = self.store.clone();
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(|e| Status::internal(format!("usage task: {e}")))?
            .map_err(|e: Error| Status::from(e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![FilesystemUsage {
                timestamp: now,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.store.root().display().to_string(),
                }),
                used_bytes: Some(UInt64Value { value: usage.bytes }),
                inodes_used: Some(UInt64Value {
                    value: usage.inodes,
                }),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(user_of("1000"), (Some(1000), String::new()));
        assert_eq!(user_of("1000:50"), (Some(1000), String::new()));
        assert_eq!(user_of("nobody"), (None, "nobody".into()));
        assert_eq!(user_of("www:www"), (None, "www".into()));
    }
}
