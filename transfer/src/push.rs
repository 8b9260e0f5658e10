//! `push`: an image of the local cache to one or more tags of transports.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use sarde_api::oci::Descriptor;
use sarde_api::transport::{Access, RawManifest};
use sarde_api::{Transport, TransportError};
use sarde_transport_oci_dir::Layout;

use crate::counters::Counters;
use crate::manifest::{self, MAX_DEPTH, Refs};
use crate::progress::{Event, Progress};
use crate::retry::retrying;
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

/// What to push.
#[derive(Clone)]
pub struct PushRequest {
    /// The layout holding the image.
    pub layout: PathBuf,
    /// Tag or digest in the layout.
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

/// An image read from the layout: manifests (children first) and blobs.
struct LocalImage {
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
        let layout = Layout::open(&self.layout)?;
        let image = self.read_local(&layout)?;
        let counters = Counters::default();
        let mut mount_from = self.mount_from.clone();
        let mut outcomes = Vec::new();
        for target in &self.targets {
            let manifest_only = self
                .push_to(
                    &layout,
                    &image,
                    target,
                    &mount_from,
                    options,
                    &progress,
                    &counters,
                )
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

    fn read_local(&self, layout: &Layout) -> Result<LocalImage, TransferError> {
        let descriptor = layout.resolve(&self.reference)?;
        let manifest = RawManifest {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            bytes: layout.read_blob(&descriptor)?,
        };
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
                        let raw = RawManifest {
                            media_type: child.media_type.clone(),
                            digest: child.digest.clone(),
                            bytes: layout.read_blob(&child)?,
                        };
                        pending.push((raw.clone(), depth + 1));
                        // Children go up before the index that names them.
                        children.insert(0, raw);
                    }
                }
            }
        }
        for blob in &blobs {
            if !layout.has_blob(blob) {
                // Fail before anything is uploaded, naming what is missing.
                layout.open_blob(blob)?;
            }
        }
        Ok(LocalImage {
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
        layout: &Layout,
        image: &LocalImage,
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
                        self.push_blob(layout, blob, target, sources, options, progress, counters)
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
        layout: &Layout,
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
        let path = layout.blob_path(&blob.digest);
        let path = &path;
        let (result, retries) = retrying(options, &what, |attempt| async move {
            // An upload whose answer never came may have landed all the same
            // (a slow commit): don't send gigabytes twice.
            if attempt > 0 && t.blob_exists(&target.repository, blob).await? {
                return Ok(());
            }
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(TransferError::io(&path, "opening the blob"))?;
            let reader = CountingReader {
                inner: tokio::io::BufReader::with_capacity(1 << 20, file),
                digest: blob.digest.clone(),
                progress: progress.clone(),
            };
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

/// Reports upload progress as the transport reads the blob.
struct CountingReader<R> {
    inner: R,
    digest: sarde_api::Digest,
    progress: Arc<dyn Progress>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.progress.event(&Event::Bytes {
                digest: &this.digest,
                n,
            });
        }
        poll
    }
}
