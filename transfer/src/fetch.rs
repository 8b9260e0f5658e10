//! `fetch`: an image from a transport into a layout of the local cache.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use sarde_api::oci::Descriptor;
use sarde_api::transport::{Access, RawManifest};
use sarde_api::{Digest, Transport};
use sarde_lifecycle::Lease;
use sarde_transport_oci_dir::{Layout, OciDir};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::counters::Counters;
use crate::error::VerifyFailure;
use crate::lock::{BlobLock, state_dir};
use crate::manifest::{self, MAX_DEPTH, Refs};
use crate::progress::{Event, Progress};
use crate::retry::backoff;
use crate::{BlobGate, MAX_BACKOFF, Summary, TransferError, TransferOptions};

/// Bytes read from the network per write to the partial file.
const READ_CHUNK: usize = 1 << 20;

/// What to fetch and where to put it.
#[derive(Clone)]
pub struct FetchRequest {
    pub source: Arc<dyn Transport>,
    /// The repository in the source.
    pub repository: String,
    /// Tag or `sha256:` digest in the source.
    pub reference: String,
    /// The root of the cache (blob locks, partial downloads, blobs to share).
    pub cache: PathBuf,
    /// The layout the image goes into.
    pub layout: PathBuf,
    /// The tag to set there; `None` lists the manifest untagged (by digest).
    pub tag: Option<String>,
    /// The image's name in messages.
    pub image: String,
    /// The command's lease on the cache: the blobs of the image are claimed in it
    /// before they are looked for, so a concurrent prune never takes one.
    pub lease: Arc<Lease>,
}

/// A manifest and everything it references, read from the source.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub manifest: RawManifest,
    /// Manifests an index names (empty for an image manifest).
    pub children: Vec<RawManifest>,
    /// Every blob, once, in manifest order.
    pub blobs: Vec<Descriptor>,
    /// The layout already has this manifest under the tag and every blob.
    pub up_to_date: bool,
    /// Bytes of manifests downloaded.
    pub manifest_bytes: u64,
}

impl ResolvedImage {
    /// What fetching this image moves when the layout already holds all of it:
    /// the manifest requests, every blob skipped.
    pub fn up_to_date_summary(&self) -> Summary {
        Summary {
            bytes_received: self.manifest_bytes,
            blobs_skipped: self.blobs.len(),
            bytes_skipped: self.blobs.iter().map(|b| b.size).sum(),
            ..Summary::default()
        }
    }

    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.manifest.media_type.clone(),
            self.manifest.digest.clone(),
            self.manifest.bytes.len() as u64,
        )
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub manifest: Descriptor,
    pub summary: Summary,
    pub up_to_date: bool,
}

impl FetchRequest {
    /// Resolves, downloads what is missing, then writes the manifest and tag.
    pub async fn run(
        &self,
        options: &TransferOptions,
        progress: &dyn Progress,
    ) -> Result<Fetched, TransferError> {
        let started = Instant::now();
        let resolved = self.resolve(options).await?;
        self.finish(&resolved, options, progress, started).await
    }

    /// The rest of [`FetchRequest::run`] once the image is resolved (a caller
    /// may make room in between): downloads what is missing and writes the
    /// manifests and the tag, unless the layout is up to date.
    pub async fn finish(
        &self,
        resolved: &ResolvedImage,
        options: &TransferOptions,
        progress: &dyn Progress,
        started: Instant,
    ) -> Result<Fetched, TransferError> {
        let mut summary = if resolved.up_to_date {
            resolved.up_to_date_summary()
        } else {
            let mut summary = Summary {
                bytes_received: resolved.manifest_bytes,
                ..Summary::default()
            };
            summary.add(&self.fetch_blobs(resolved, options, progress, None).await?);
            self.commit(resolved)?;
            summary
        };
        progress.event(&Event::Finish { image: &self.image });
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(Fetched {
            manifest: resolved.descriptor(),
            summary,
            up_to_date: resolved.up_to_date,
        })
    }

    fn existing_layout(&self) -> Option<Layout> {
        Layout::open(&self.layout).ok()
    }

    /// Reads the manifest (one request when the tag has not changed) and, for an
    /// index, its child manifests.
    pub async fn resolve(&self, options: &TransferOptions) -> Result<ResolvedImage, TransferError> {
        self.source.will_access(&self.repository, Access::Pull);
        let manifest = self.get_manifest(&self.reference, options).await?;
        let mut manifest_bytes = manifest.bytes.len() as u64;
        let local = self.existing_layout();
        let mut children = Vec::new();
        let mut blobs = Vec::new();
        let mut pending = vec![(manifest.clone(), 0usize)];
        while let Some((m, depth)) = pending.pop() {
            match manifest::references(&self.image, &m)? {
                Refs::Image(b) => blobs.extend(b),
                Refs::Index(refs) => {
                    if depth + 1 >= MAX_DEPTH {
                        return Err(TransferError::Manifest {
                            image: self.image.clone(),
                            digest: m.digest.to_string(),
                            message: "an index inside an index: sarde copies one level".into(),
                        });
                    }
                    for child in refs {
                        if !manifest::is_manifest(&child.media_type) {
                            // An artifact index may name plain blobs.
                            blobs.push(child);
                            continue;
                        }
                        let local_copy = local
                            .as_ref()
                            .filter(|l| l.has_blob(&child))
                            .and_then(|l| l.read_blob(&child).ok());
                        let raw = match local_copy {
                            Some(bytes) => RawManifest {
                                media_type: child.media_type.clone(),
                                digest: child.digest.clone(),
                                bytes,
                            },
                            None => {
                                let raw = self
                                    .get_manifest(&child.digest.to_string(), options)
                                    .await?;
                                manifest_bytes += raw.bytes.len() as u64;
                                raw
                            }
                        };
                        if raw.digest != child.digest || raw.bytes.len() as u64 != child.size {
                            return Err(TransferError::Manifest {
                                image: self.image.clone(),
                                digest: child.digest.to_string(),
                                message: format!(
                                    "the registry answered with {} ({} bytes) instead",
                                    raw.digest,
                                    raw.bytes.len()
                                ),
                            });
                        }
                        pending.push((raw.clone(), depth + 1));
                        children.push(raw);
                    }
                }
            }
        }
        let blobs = manifest::unique(blobs);
        let up_to_date = local.as_ref().is_some_and(|l| {
            let tagged = l
                .resolve(self.tag.as_deref().unwrap_or(&self.reference))
                .is_ok_and(|d| d.digest == manifest.digest);
            tagged
                && children.iter().all(|c| {
                    l.has_blob(&Descriptor::new("", c.digest.clone(), c.bytes.len() as u64))
                })
                && blobs.iter().all(|b| l.has_blob(b))
        });
        Ok(ResolvedImage {
            manifest,
            children,
            blobs,
            up_to_date,
            manifest_bytes,
        })
    }

    async fn get_manifest(
        &self,
        reference: &str,
        options: &TransferOptions,
    ) -> Result<RawManifest, TransferError> {
        manifest::get(
            self.source.as_ref(),
            &self.repository,
            reference,
            &self.image,
            options,
        )
        .await
    }

    /// Downloads every blob the layout lacks, `options.concurrency` at a time,
    /// telling `gate` about each one as it lands.
    pub async fn fetch_blobs(
        &self,
        resolved: &ResolvedImage,
        options: &TransferOptions,
        progress: &dyn Progress,
        gate: Option<&BlobGate>,
    ) -> Result<Summary, TransferError> {
        let started = Instant::now();
        let layout = Layout::create(&self.layout)?;
        let claimed = resolved
            .blobs
            .iter()
            .map(|b| &b.digest)
            .chain(resolved.children.iter().map(|c| &c.digest))
            .chain([&resolved.manifest.digest]);
        let reference = self.tag.as_deref().unwrap_or(&self.reference);
        self.lease
            .protect_layout(&layout)
            .and_then(|()| self.lease.protect_image(&layout, reference))
            .and_then(|()| self.lease.protect_blobs(&layout, claimed))
            .map_err(|e| TransferError::Aborted(format!("taking a lease on the cache: {e}")))?;
        let total: u64 = resolved.blobs.iter().map(|b| b.size).sum();
        progress.event(&Event::Start {
            image: &self.image,
            blobs: resolved.blobs.len(),
            bytes: total,
        });
        // Layouts of other repositories, to share blobs with instead of downloading.
        let others: Vec<Layout> = OciDir::new(&self.cache)
            .repositories()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.path != self.layout)
            .filter_map(|r| Layout::open(&r.path).ok())
            .collect();
        let counters = Counters::default();
        let result = futures_util::stream::iter(resolved.blobs.iter())
            .map(|blob| {
                let (layout, others, counters) = (&layout, &others, &counters);
                async move {
                    let downloaded = self
                        .fetch_blob(layout, others, blob, options, progress, counters)
                        .await?;
                    if let Some(gate) = gate {
                        gate.ready(&blob.digest, downloaded);
                    }
                    Ok::<(), TransferError>(())
                }
            })
            .buffer_unordered(options.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await;
        if let Err(e) = result {
            if let Some(gate) = gate {
                gate.fail(e.to_string());
            }
            return Err(e);
        }
        Ok(counters.into_summary(started.elapsed().as_secs_f64()))
    }

    /// Writes the manifests (children first) and the tag: the image appears in the
    /// cache only now, complete.
    pub fn commit(&self, resolved: &ResolvedImage) -> Result<Descriptor, TransferError> {
        let layout = Layout::create(&self.layout)?;
        for child in &resolved.children {
            layout.put_manifest(&child.bytes, &child.media_type)?;
        }
        let descriptor =
            layout.put_manifest(&resolved.manifest.bytes, &resolved.manifest.media_type)?;
        match &self.tag {
            Some(tag) => layout.set_tag(tag, &descriptor)?,
            None => layout.add_untagged(&descriptor)?,
        }
        Ok(descriptor)
    }

    /// Makes `blob` present in `layout`; `Ok(true)` when it was downloaded (and so
    /// verified by size and digest) now, `Ok(false)` when it was there or linked.
    async fn fetch_blob(
        &self,
        layout: &Layout,
        others: &[Layout],
        blob: &Descriptor,
        options: &TransferOptions,
        progress: &dyn Progress,
        counters: &Counters,
    ) -> Result<bool, TransferError> {
        if layout.has_blob(blob) {
            counters.skip(blob, false, progress);
            return Ok(false);
        }
        let _lock = BlobLock::acquire(&self.cache, &blob.digest).await?;
        // Another process may have fetched it while we waited for the lock.
        if layout.has_blob(blob) {
            counters.skip(blob, false, progress);
            return Ok(false);
        }
        for other in others {
            if layout.mount_blob_from(other, blob)? {
                tracing::debug!("{}: linked from {}", blob.digest, other.path().display());
                counters.skip(blob, true, progress);
                return Ok(false);
            }
        }
        self.download(layout, blob, options, progress, counters)
            .await?;
        counters.transferred.fetch_add(1, Ordering::Relaxed);
        progress.event(&Event::Done {
            digest: &blob.digest,
            size: blob.size,
        });
        Ok(true)
    }

    /// Downloads into `<cache>/.sarde/partial/<algo>-<hex>`, resuming what an
    /// earlier attempt or run left there, verifies, and renames into the layout.
    async fn download(
        &self,
        layout: &Layout,
        blob: &Descriptor,
        options: &TransferOptions,
        progress: &dyn Progress,
        counters: &Counters,
    ) -> Result<(), TransferError> {
        let dir = state_dir(&self.cache).join("partial");
        fs::create_dir_all(&dir)
            .map_err(TransferError::io(&dir, "creating the download directory"))?;
        let path = dir.join(format!(
            "{}-{}",
            blob.digest.algorithm().name(),
            blob.digest.hex()
        ));
        let mut from_scratch_done = false;
        loop {
            let (mut file, mut hasher, mut have) = open_partial(&path, blob.size)?;
            let resumed = have;
            if have > 0 {
                tracing::info!(
                    "{}: resuming {} at {have} of {} bytes",
                    self.image,
                    blob.digest,
                    blob.size
                );
                progress.event(&Event::Bytes {
                    digest: &blob.digest,
                    n: have,
                });
            }
            let mut attempt = 0u32;
            while have < blob.size {
                match self
                    .stream_into(
                        &mut file,
                        &mut hasher,
                        &mut have,
                        blob,
                        &path,
                        progress,
                        counters,
                    )
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.is_transient() && attempt < options.retries => {
                        if !options.retry_budget.take() {
                            return Err(options.retry_budget.give_up(e));
                        }
                        let wait = e.retry_after().unwrap_or_else(|| backoff(options, attempt));
                        let message = format!(
                            "{}: {e}; retrying in {:.1}s ({}/{})",
                            self.image,
                            wait.as_secs_f64(),
                            attempt + 1,
                            options.retries
                        );
                        tracing::warn!("{message}");
                        progress.event(&Event::Retry { message: &message });
                        counters.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            let actual = Digest::from_sha256(hasher.finalize().into());
            if actual != blob.digest {
                let _ = fs::remove_file(&path);
                if resumed > 0 && !from_scratch_done {
                    // The earlier run's bytes may be the damaged part: once more, whole.
                    tracing::warn!(
                        "{}: {} did not verify after resuming; downloading it again",
                        self.image,
                        blob.digest
                    );
                    from_scratch_done = true;
                    continue;
                }
                return Err(TransferError::Verify(Box::new(VerifyFailure {
                    image: self.image.clone(),
                    location: self.source.location(),
                    digest: blob.digest.clone(),
                    what: "digest",
                    expected: blob.digest.to_string(),
                    actual: actual.to_string(),
                })));
            }
            file.sync_all()
                .map_err(TransferError::io(&path, "syncing the download"))?;
            drop(file);
            return move_into(layout, blob, &path);
        }
    }

    /// One request: appends what arrives to the partial file.
    #[allow(clippy::too_many_arguments)]
    async fn stream_into(
        &self,
        file: &mut File,
        hasher: &mut Sha256,
        have: &mut u64,
        blob: &Descriptor,
        path: &Path,
        progress: &dyn Progress,
        counters: &Counters,
    ) -> Result<(), TransferError> {
        let mut reader = self.source.get_blob(&self.repository, blob, *have).await?;
        let mut buf = vec![0u8; READ_CHUNK];
        while *have < blob.size {
            let n = match reader.read(&mut buf).await {
                Ok(0) => {
                    return Err(TransferError::Stream {
                        location: self.source.location(),
                        digest: blob.digest.clone(),
                        received: *have,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    });
                }
                Ok(n) => n.min(usize::try_from(blob.size - *have).unwrap_or(usize::MAX)),
                Err(source) => {
                    return Err(TransferError::Stream {
                        location: self.source.location(),
                        digest: blob.digest.clone(),
                        received: *have,
                        source,
                    });
                }
            };
            file.write_all(&buf[..n])
                .map_err(TransferError::io(path, "writing the download"))?;
            sarde_api::writeback::start_writeback(file, *have, n as u64);
            hasher.update(&buf[..n]);
            *have += n as u64;
            counters.received.fetch_add(n as u64, Ordering::Relaxed);
            progress.event(&Event::Bytes {
                digest: &blob.digest,
                n: n as u64,
            });
        }
        Ok(())
    }
}

/// Opens (or creates) a partial download and hashes what it holds; a file longer
/// than the blob is started over.
fn open_partial(path: &Path, size: u64) -> Result<(File, Sha256, u64), TransferError> {
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(TransferError::io(path, "opening the partial download"))?;
    let len = file
        .metadata()
        .map_err(TransferError::io(path, "reading the partial download"))?
        .len();
    let mut hasher = Sha256::new();
    if len > size {
        file.set_len(0)
            .map_err(TransferError::io(path, "truncating the partial download"))?;
        return Ok((file, hasher, 0));
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let mut have = 0u64;
    while have < len {
        let n = file
            .read(&mut buf)
            .map_err(TransferError::io(path, "reading the partial download"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        have += n as u64;
    }
    file.seek(SeekFrom::Start(have))
        .map_err(TransferError::io(path, "seeking in the partial download"))?;
    file.set_len(have)
        .map_err(TransferError::io(path, "truncating the partial download"))?;
    Ok((file, hasher, have))
}

/// Moves a verified download into the layout (a rename within the cache; a
/// verified copy across file systems).
fn move_into(layout: &Layout, blob: &Descriptor, partial: &Path) -> Result<(), TransferError> {
    let target = layout.blob_path(&blob.digest);
    let dir = target
        .parent()
        .expect("blob paths have a directory")
        .to_path_buf();
    fs::create_dir_all(&dir).map_err(TransferError::io(&dir, "creating the blob directory"))?;
    match fs::rename(partial, &target) {
        Ok(()) => {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(TransferError::io(&dir, "syncing the blob directory"))?;
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut input = File::open(partial)
                .map_err(TransferError::io(partial, "reopening the download"))?;
            let mut writer = layout.blob_writer()?;
            std::io::copy(&mut input, &mut writer).map_err(TransferError::io(
                &target,
                "copying the download into the layout",
            ))?;
            writer.commit(Some((&blob.digest, blob.size)))?;
            let _ = fs::remove_file(partial);
            Ok(())
        }
        Err(e) => Err(TransferError::io(
            &target,
            "moving the download into the layout",
        )(e)),
    }
}
