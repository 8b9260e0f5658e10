//! `push` and `copy`: an image of one transport (the cache, for a push) to one
//! or more tags of others. Both ends are [`Transport`]s; every blob is verified
//! by size and digest on its way (a wrong one never completes at the
//! destination), blobs the destination has are skipped, blobs in another
//! repository of the same location are mounted, and manifests go last.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use sarde_api::oci::Descriptor;
use sarde_api::transport::{Access, RawManifest};
use sarde_api::{Transport, TransportError};

use crate::counters::Counters;
use crate::manifest::{self, MAX_DEPTH, Refs};
use crate::progress::{Event, Progress};
use crate::retry::retrying;
use crate::verify::VerifyingReader;
use crate::{Summary, TransferError, TransferOptions};

/// One destination of a push.
#[derive(Clone)]
pub struct PushTarget {
    pub transport: Arc<dyn Transport>,
    pub repository: String,
    /// Tag to set; `None` pushes by digest only.
    pub tag: Option<String>,
    /// The destination's name in messages.
    pub name: String,
}

/// What to push (or copy), and where from.
#[derive(Clone)]
pub struct PushRequest {
    /// Where the image is: the cache, or any transport.
    pub source: Arc<dyn Transport>,
    pub repository: String,
    /// Tag or digest at the source.
    pub reference: String,
    /// The image's name in messages.
    pub image: String,
    pub targets: Vec<PushTarget>,
    /// Repositories (`location`, `repository`) that may already hold the blobs,
    /// to mount from when a target is at the same location.
    pub mount_from: Vec<(String, String)>,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub manifest: Descriptor,
    /// Per target: its name and whether only the manifest had to be written.
    pub targets: Vec<(String, bool)>,
    pub summary: Summary,
}

/// An image read from the source: manifests (children first) and blobs.
struct SourceImage {
    manifest: RawManifest,
    children: Vec<RawManifest>,
    blobs: Vec<Descriptor>,
}

impl PushRequest {
    pub async fn run(
        &self,
        options: &TransferOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<Pushed, TransferError> {
        let started = Instant::now();
        self.source.will_access(&self.repository, Access::Pull);
        let image = self.read_source(options).await?;
        let counters = Counters::default();
        let mut mount_from = self.mount_from.clone();
        let mut outcomes = Vec::new();
        for target in &self.targets {
            let manifest_only = self
                .push_to(&image, target, &mount_from, options, &progress, &counters)
                .await?;
            outcomes.push((target.name.clone(), manifest_only));
            mount_from.push((target.transport.location(), target.repository.clone()));
            progress.event(&Event::Finish {
                image: &target.name,
            });
        }
        Ok(Pushed {
            manifest: Descriptor::new(
                image.manifest.media_type.clone(),
                image.manifest.digest.clone(),
                image.manifest.bytes.len() as u64,
            ),
            targets: outcomes,
            summary: counters.into_summary(started.elapsed().as_secs_f64()),
        })
    }

    async fn get_manifest(
        &self,
        reference: &str,
        options: &TransferOptions,
    ) -> Result<RawManifest, TransferError> {
        let manifest = manifest::get(
            self.source.as_ref(),
            &self.repository,
            reference,
            &self.image,
            options,
        )
        .await?;
        // Whatever a (plugin) source claims, the bytes are what is checked.
        let actual = sarde_api::Digest::sha256_of(&manifest.bytes);
        let asked = reference.parse::<sarde_api::Digest>().ok();
        if actual != manifest.digest || asked.is_some_and(|d| d != actual) {
            return Err(TransferError::Manifest {
                image: self.image.clone(),
                digest: manifest.digest.to_string(),
                message: format!("the source's bytes hash to {actual}"),
            });
        }
        Ok(manifest)
    }

    async fn read_source(&self, options: &TransferOptions) -> Result<SourceImage, TransferError> {
        let manifest = self.get_manifest(&self.reference, options).await?;
        let mut children = Vec::new();
        let mut blobs = Vec::new();
        let mut pending = vec![(manifest.clone(), 0usize)];
        while let Some((m, depth)) = pending.pop() {
            match manifest::references(&self.image, &m)? {
                Refs::Image(b) => blobs.extend(b),
                Refs::Index(refs) => {
                    for child in refs {
                        if !manifest::is_manifest(&child.media_type) || depth + 1 >= MAX_DEPTH {
                            blobs.push(child);
                            continue;
                        }
                        let raw = self
                            .get_manifest(&child.digest.to_string(), options)
                            .await?;
                        if raw.digest != child.digest {
                            return Err(TransferError::Manifest {
                                image: self.image.clone(),
                                digest: child.digest.to_string(),
                                message: format!("the source answered with {}", raw.digest),
                            });
                        }
                        pending.push((raw.clone(), depth + 1));
                        // Children go up before the index that names them.
                        children.insert(0, raw);
                    }
                }
            }
        }
        for blob in &blobs {
            // Fail before anything is uploaded, naming what is missing.
            if !self.source.blob_exists(&self.repository, blob).await? {
                return Err(TransferError::Transport(TransportError::BlobUnknown {
                    location: self.source.location(),
                    repository: self.repository.clone(),
                    digest: blob.digest.clone(),
                }));
            }
        }
        Ok(SourceImage {
            manifest,
            children,
            blobs: manifest::unique(blobs),
        })
    }

    /// Pushes to one target; `Ok(true)` when the registry had the whole image and
    /// only the tag was written.
    #[allow(clippy::too_many_arguments)]
    async fn push_to(
        &self,
        image: &SourceImage,
        target: &PushTarget,
        mount_from: &[(String, String)],
        options: &TransferOptions,
        progress: &Arc<dyn Progress>,
        counters: &Counters,
    ) -> Result<bool, TransferError> {
        let t = target.transport.as_ref();
        let location = t.location();
        let total: u64 = image.blobs.iter().map(|b| b.size).sum();
        progress.event(&Event::Start {
            image: &target.name,
            blobs: image.blobs.len(),
            bytes: total,
        });
        let sources: Vec<&str> = mount_from
            .iter()
            .filter(|(l, r)| *l == location && *r != target.repository)
            .map(|(_, r)| r.as_str())
            .collect();
        // One token for the target and every mount source.
        t.will_access(&target.repository, Access::Push);
        for from in &sources {
            t.will_access(from, Access::Pull);
        }
        // A manifest the repository has implies it has every blob it names.
        let digest = image.manifest.digest.to_string();
        let (present, _) = retrying(options, &target.name, |_| async {
            match t.get_manifest(&target.repository, &digest).await {
                Ok(m) => Ok(m.digest == image.manifest.digest),
                Err(TransportError::ManifestUnknown { .. }) => Ok(false),
                Err(e) => Err(TransferError::from(e)),
            }
        })
        .await;
        let manifest_only = present?;
        if manifest_only {
            tracing::info!(
                "{}: the registry has {digest}; writing the tag only",
                target.name
            );
            for blob in &image.blobs {
                counters.skip(blob, false, progress.as_ref());
            }
        } else {
            futures_util::stream::iter(image.blobs.iter())
                .map(|blob| {
                    let sources = &sources;
                    async move {
                        self.push_blob(blob, target, sources, options, progress, counters)
                            .await
                    }
                })
                .buffer_unordered(options.concurrency.max(1))
                .try_collect::<Vec<()>>()
                .await?;
            for child in &image.children {
                self.put_manifest(target, &child.digest.to_string(), child, options)
                    .await?;
            }
        }
        let reference = target.tag.clone().unwrap_or(digest);
        self.put_manifest(target, &reference, &image.manifest, options)
            .await?;
        counters
            .sent
            .fetch_add(image.manifest.bytes.len() as u64, Ordering::Relaxed);
        Ok(manifest_only)
    }

    async fn put_manifest(
        &self,
        target: &PushTarget,
        reference: &str,
        manifest: &RawManifest,
        options: &TransferOptions,
    ) -> Result<(), TransferError> {
        let (result, _) = retrying(options, &target.name, |_| async {
            Ok(target
                .transport
                .put_manifest(&target.repository, reference, manifest)
                .await?)
        })
        .await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_blob(
        &self,
        blob: &Descriptor,
        target: &PushTarget,
        mount_sources: &[&str],
        options: &TransferOptions,
        progress: &Arc<dyn Progress>,
        counters: &Counters,
    ) -> Result<(), TransferError> {
        let t = target.transport.as_ref();
        let what = format!("{}: blob {}", target.name, blob.digest);
        let (exists, retries) = retrying(options, &what, |_| async {
            Ok(t.blob_exists(&target.repository, blob).await?)
        })
        .await;
        counters.retries.fetch_add(retries, Ordering::Relaxed);
        let skip = |mounted: bool| counters.skip(blob, mounted, progress.as_ref());
        if exists? {
            skip(false);
            return Ok(());
        }
        for from in mount_sources {
            let (mounted, _) = retrying(options, &what, |_| async {
                Ok(t.mount_blob(&target.repository, from, blob).await?)
            })
            .await;
            match mounted {
                Ok(true) => {
                    tracing::debug!("{what}: mounted from {from}");
                    skip(true);
                    return Ok(());
                }
                Ok(false) => {}
                // A refused mount is no reason to fail: upload instead.
                Err(e) => tracing::debug!("{what}: mount from {from} failed: {e}"),
            }
        }
        let (result, retries) = retrying(options, &what, |attempt| async move {
            // An upload whose answer never came may have landed all the same
            // (a slow commit): don't send gigabytes twice.
            if attempt > 0 && t.blob_exists(&target.repository, blob).await? {
                return Ok(());
            }
            let data = self.source.get_blob(&self.repository, blob, 0).await?;
            let reader = VerifyingReader::new(
                tokio::io::BufReader::with_capacity(1 << 20, data),
                blob.clone(),
                self.source.location(),
                progress.clone(),
            );
            t.put_blob(&target.repository, blob, Box::pin(reader))
                .await?;
            Ok(())
        })
        .await;
        counters.retries.fetch_add(retries, Ordering::Relaxed);
        result?;
        counters.sent.fetch_add(blob.size, Ordering::Relaxed);
        counters.transferred.fetch_add(1, Ordering::Relaxed);
        progress.event(&Event::Done {
            digest: &blob.digest,
            size: blob.size,
        });
        Ok(())
    }
}
