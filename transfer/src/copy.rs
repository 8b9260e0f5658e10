//! The copy engine: an image of one [`Transport`] to one or more tags of
//! others — `push` (the cache to registries), `fetch` (anything to the cache),
//! `copy` (anything to anything) are this one code with other ends.
//!
//! - Every blob is verified by size and digest on its way (a wrong one never
//!   completes at the destination); the destination verifies again what it
//!   resumed.
//! - A destination that has a blob, or links it from another of its
//!   repositories, is not sent it; one at the same location as a source
//!   repository mounts it; a destination holding the whole image gets the tag.
//! - A destination that kept part of a blob from an interrupted run (the
//!   cache, a directory) is sent only the rest; transient failures are retried
//!   with backoff and resume the same way.
//! - Manifests go last (children first), so a cut copy leaves no half image.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use sarde_api::Digest;
use sarde_api::oci::Descriptor;
use sarde_api::transport::{Access, BlobSink, BlobWrite, RawManifest};
use sarde_api::{Transport, TransportError};

use crate::counters::Counters;
use crate::manifest::{self, MAX_DEPTH, Refs};
use crate::progress::{Event, Progress};
use crate::retry::{backoff, retrying};
use crate::verify::{ReadFailure, VerifyingReader};
use crate::{BlobGate, MAX_BACKOFF, Summary, TransferError, TransferOptions, VerifyFailure};

/// One destination of a copy.
#[derive(Clone)]
pub struct Destination {
    pub transport: Arc<dyn Transport>,
    pub repository: String,
    /// Tag to set; `None` writes by digest only.
    pub tag: Option<String>,
    /// The destination's name in messages.
    pub name: String,
}

/// Which bytes a summary counts as moved over the network: what was read from
/// a remote source (`bytes_received`), written to a remote destination
/// (`bytes_sent`), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    Received,
    Sent,
    Both,
}

/// What to copy, from where, to where.
#[derive(Clone)]
pub struct CopyRequest {
    pub source: Arc<dyn Transport>,
    pub repository: String,
    /// Tag or digest at the source (empty: the one image a layout holds).
    pub reference: String,
    /// The image's name in messages.
    pub image: String,
    pub destinations: Vec<Destination>,
    /// Repositories (`location`, `repository`) that may already hold the blobs,
    /// to mount from when a destination is at the same location.
    pub mount_from: Vec<(String, String)>,
    /// Ask the source for every blob before writing anything, so a missing one
    /// fails before the first byte moves (for a local source, where asking is
    /// cheap; a registry source fails on the blob itself).
    pub check_source_blobs: bool,
    pub counting: Counting,
    /// Told about each blob as it is complete at the (first) destination, so a
    /// consumer (pull's import) can use it while the rest still moves.
    pub gate: Option<Arc<BlobGate>>,
    /// Blobs not copied, because the consumer has their content already (pull's
    /// import copies unchanged pieces from the previous version of a VM); the
    /// gate says so to whoever waits for one. Only with `blobs_only`: a
    /// destination would refuse a manifest whose blobs it lacks.
    pub withheld: BTreeSet<Digest>,
    /// Copies the blobs only; the caller writes the manifest and tag itself
    /// (pull's, once the import is done, for an image kept without its pieces).
    pub blobs_only: bool,
    /// What travels with the image (its signatures): each attachment the
    /// source has goes along, written before the destination finishes the
    /// image (an archive is closed then). `None`: nothing travels along.
    pub attachments: Option<Arc<dyn Attachments>>,
}

/// Images that belong to another under tags of their own (cosign's
/// `sha256-<hex>.sig`), and how the destination's and the source's versions of
/// one combine, so a copy never drops what the destination had.
pub trait Attachments: Send + Sync {
    /// The tags of the attachments of the image `manifest`.
    fn tags(&self, manifest: &Digest) -> Vec<String>;

    /// What to write where the destination has `existing` under an
    /// attachment's tag and the source `incoming`.
    fn merge(&self, existing: &[u8], incoming: &[u8]) -> Merge;
}

/// How an attachment lands at a destination that has one under its tag.
pub enum Merge {
    /// Write the source's as it is.
    Incoming,
    /// The destination's has everything already: write nothing.
    Existing,
    /// Write this manifest; `blobs` are those it names that neither side has
    /// yet (the source's blobs are copied as usual).
    Combined {
        manifest: Vec<u8>,
        blobs: Vec<(Descriptor, Vec<u8>)>,
    },
}

/// An image that travels with another under a tag of its own (a signature).
#[derive(Debug, Clone)]
pub struct Attachment {
    pub tag: String,
    pub manifest: RawManifest,
    pub blobs: Vec<Descriptor>,
}

/// Attachments are small (a signature's payload is about 250 bytes); a bigger
/// blob is refused rather than read into memory.
pub const MAX_ATTACHMENT_BLOB: u64 = 16 << 20;
/// The bytes of all of an image's attachments together: beyond it (a hostile
/// source's thousands of blobs) an attachment is left behind, with a warning,
/// rather than fill the destination outside its space accounting.
pub const MAX_ATTACHMENT_BYTES: u64 = 64 << 20;

/// What a copy did.
#[derive(Debug, Clone)]
pub struct Copied {
    pub manifest: Descriptor,
    /// Per destination: its name and whether only the manifest had to be written.
    pub targets: Vec<(String, bool)>,
    pub summary: Summary,
}

/// An image as read from the source: its manifest, child manifests (children
/// before the index that names them) and blobs.
#[derive(Debug, Clone)]
pub struct SourceImage {
    pub manifest: RawManifest,
    pub children: Vec<RawManifest>,
    /// Every blob, once, in manifest order.
    pub blobs: Vec<Descriptor>,
    /// Bytes of manifests read.
    pub manifest_bytes: u64,
    /// Images that travel with it (its signatures).
    pub attachments: Vec<Attachment>,
}

impl SourceImage {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.manifest.media_type.clone(),
            self.manifest.digest.clone(),
            self.manifest.bytes.len() as u64,
        )
    }

    /// The blobs and child manifests: what a destination must hold besides
    /// the manifest.
    pub fn contents(&self) -> Vec<Descriptor> {
        let children = self
            .children
            .iter()
            .map(|c| Descriptor::new(c.media_type.clone(), c.digest.clone(), c.bytes.len() as u64));
        self.blobs.iter().cloned().chain(children).collect()
    }

    /// What copying this image moves when every destination holds all of it.
    pub fn up_to_date_summary(&self, counting: Counting) -> Summary {
        let mut summary = Summary {
            blobs_skipped: self.blobs.len(),
            bytes_skipped: self.blobs.iter().map(|b| b.size).sum(),
            ..Summary::default()
        };
        if counting != Counting::Sent {
            summary.bytes_received = self.manifest_bytes;
        }
        summary
    }
}

impl CopyRequest {
    /// Reads the source, then copies to every destination.
    pub async fn run(
        &self,
        options: &TransferOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<Copied, TransferError> {
        let started = Instant::now();
        let image = self.resolve(options).await?;
        self.copy_resolved(&image, options, progress, started).await
    }

    /// Reads the manifest, its children, and (with `check_source_blobs`)
    /// checks the source has every blob.
    pub async fn resolve(&self, options: &TransferOptions) -> Result<SourceImage, TransferError> {
        self.source.will_access(&self.repository, Access::Pull);
        let manifest = self.get_manifest(&self.reference, options).await?;
        let mut manifest_bytes = manifest.bytes.len() as u64;
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
                        let raw = self
                            .get_manifest(&child.digest.to_string(), options)
                            .await?;
                        manifest_bytes += raw.bytes.len() as u64;
                        if raw.digest != child.digest || raw.bytes.len() as u64 != child.size {
                            return Err(TransferError::Manifest {
                                image: self.image.clone(),
                                digest: child.digest.to_string(),
                                message: format!(
                                    "the source answered with {} ({} bytes) instead",
                                    raw.digest,
                                    raw.bytes.len()
                                ),
                            });
                        }
                        pending.push((raw.clone(), depth + 1));
                        // Children are written before the index that names them.
                        children.insert(0, raw);
                    }
                }
            }
        }
        let blobs = manifest::unique(blobs);
        if self.check_source_blobs {
            for blob in &blobs {
                if !self.source.blob_exists(&self.repository, blob).await? {
                    return Err(TransferError::Transport(TransportError::BlobUnknown {
                        location: self.source.location(),
                        repository: self.repository.clone(),
                        digest: blob.digest.clone(),
                    }));
                }
            }
        }
        let attachments = self.resolve_attachments(&manifest.digest, options).await?;
        Ok(SourceImage {
            manifest,
            children,
            blobs,
            manifest_bytes,
            attachments,
        })
    }

    /// The attachments the source has for `digest`.
    async fn resolve_attachments(
        &self,
        digest: &Digest,
        options: &TransferOptions,
    ) -> Result<Vec<Attachment>, TransferError> {
        let Some(kinds) = &self.attachments else {
            return Ok(Vec::new());
        };
        let mut attachments = Vec::new();
        for tag in kinds.tags(digest) {
            let manifest = match self.get_manifest(&tag, options).await {
                Ok(m) => m,
                Err(TransferError::Transport(TransportError::ManifestUnknown { .. })) => continue,
                Err(e) => return Err(e),
            };
            let Refs::Image(blobs) = manifest::references(&self.image, &manifest)? else {
                tracing::warn!("{}: {tag} is an index, not carried", self.image);
                continue;
            };
            let bytes: u64 = blobs.iter().map(|b| b.size).sum();
            if blobs.len() > 1024 || bytes > MAX_ATTACHMENT_BYTES {
                tracing::warn!(
                    "{}: {tag} has {} blobs of {bytes} bytes, more than an attachment may have ({MAX_ATTACHMENT_BYTES} bytes): not carried",
                    self.image,
                    blobs.len()
                );
                continue;
            }
            if let Some(big) = blobs.iter().find(|b| b.size > MAX_ATTACHMENT_BLOB) {
                tracing::warn!(
                    "{}: {tag} names a blob of {} bytes, more than an attachment may have ({MAX_ATTACHMENT_BLOB}): not carried",
                    self.image,
                    big.size
                );
                continue;
            }
            attachments.push(Attachment {
                tag,
                manifest,
                blobs,
            });
        }
        Ok(attachments)
    }

    /// Writes the image's attachments to every destination that does not have
    /// them under their tags already (also when the image itself was there).
    pub async fn copy_attachments(
        &self,
        image: &SourceImage,
        options: &TransferOptions,
    ) -> Result<(), TransferError> {
        for destination in &self.destinations {
            self.attach(image, destination, options).await?;
        }
        Ok(())
    }

    async fn attach(
        &self,
        image: &SourceImage,
        destination: &Destination,
        options: &TransferOptions,
    ) -> Result<(), TransferError> {
        let t = destination.transport.as_ref();
        let Some(kinds) = &self.attachments else {
            return Ok(());
        };
        for attachment in &image.attachments {
            let existing = t
                .get_manifest(&destination.repository, &attachment.tag)
                .await;
            let merge = match existing {
                Ok(m) if m.digest == attachment.manifest.digest => continue,
                Ok(m) => kinds.merge(&m.bytes, &attachment.manifest.bytes),
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(_) => Merge::Incoming,
            };
            let (manifest, extra) = match merge {
                Merge::Existing => continue,
                Merge::Incoming => (attachment.manifest.clone(), Vec::new()),
                Merge::Combined { manifest, blobs } => (
                    RawManifest {
                        media_type: attachment.manifest.media_type.clone(),
                        digest: Digest::sha256_of(&manifest),
                        bytes: manifest,
                    },
                    blobs,
                ),
            };
            for blob in &attachment.blobs {
                if t.blob_exists(&destination.repository, blob).await? {
                    continue;
                }
                let bytes = self.read_small_blob(blob).await?;
                put_small_blob(t, &destination.repository, blob, bytes).await?;
            }
            for (blob, bytes) in extra {
                if !t.blob_exists(&destination.repository, &blob).await? {
                    put_small_blob(t, &destination.repository, &blob, bytes).await?;
                }
            }
            self.put_manifest(destination, &attachment.tag, &manifest, options)
                .await?;
            tracing::debug!("{}: {} carried along", destination.name, attachment.tag);
        }
        Ok(())
    }

    /// A small blob of the source, read whole and checked by size and digest.
    async fn read_small_blob(&self, blob: &Descriptor) -> Result<Vec<u8>, TransferError> {
        use tokio::io::AsyncReadExt;
        let reader = self.source.get_blob(&self.repository, blob, 0).await?;
        let mut bytes = Vec::with_capacity(blob.size as usize);
        reader
            .take(blob.size + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| TransferError::Stream {
                location: self.source.location(),
                digest: blob.digest.clone(),
                received: bytes.len() as u64,
                source: e,
            })?;
        let actual = Digest::sha256_of(&bytes);
        if bytes.len() as u64 != blob.size || actual != blob.digest {
            return Err(TransferError::Verify(Box::new(VerifyFailure {
                image: self.image.clone(),
                location: self.source.location(),
                digest: blob.digest.clone(),
                what: "size and digest",
                expected: format!("{} bytes, {}", blob.size, blob.digest),
                actual: format!("{} bytes, {actual}", bytes.len()),
            })));
        }
        Ok(bytes)
    }

    /// Whether every destination holds the whole image under its tag already,
    /// so the copy would write nothing.
    pub async fn up_to_date(
        &self,
        image: &SourceImage,
        options: &TransferOptions,
    ) -> Result<bool, TransferError> {
        let contents = image.contents();
        for d in &self.destinations {
            let t = d.transport.as_ref();
            let (holds, _) = retrying(options, &d.name, |_| async {
                Ok(t.holds_image(&d.repository, &image.manifest, &contents)
                    .await?)
            })
            .await;
            if !holds? {
                return Ok(false);
            }
            let Some(tag) = &d.tag else { continue };
            match t.get_manifest(&d.repository, tag).await {
                Ok(m) if m.digest == image.manifest.digest => {}
                // A broken tag (its manifest gone or damaged) is repaired by the copy.
                Err(e) if e.is_transient() => return Err(e.into()),
                Ok(_) | Err(_) => return Ok(false),
            }
        }
        Ok(true)
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

    /// Copies a resolved image to every destination.
    pub async fn copy_resolved(
        &self,
        image: &SourceImage,
        options: &TransferOptions,
        progress: Arc<dyn Progress>,
        started: Instant,
    ) -> Result<Copied, TransferError> {
        let counters = Counters::default();
        let moved = Arc::new(AtomicU64::new(0));
        let mut mount_from = self.mount_from.clone();
        let mut outcomes = Vec::new();
        for (i, destination) in self.destinations.iter().enumerate() {
            let gate = if i == 0 { self.gate.as_deref() } else { None };
            let result = self
                .copy_to(
                    image,
                    destination,
                    &mount_from,
                    options,
                    &progress,
                    &counters,
                    &moved,
                    gate,
                )
                .await;
            let manifest_only = match result {
                Ok(manifest_only) => manifest_only,
                Err(e) => {
                    if let Some(gate) = gate {
                        gate.fail(e.to_string());
                    }
                    return Err(e);
                }
            };
            outcomes.push((destination.name.clone(), manifest_only));
            mount_from.push((
                destination.transport.location(),
                destination.repository.clone(),
            ));
            progress.event(&Event::Finish {
                image: &destination.name,
            });
        }
        let mut summary = counters.into_summary(started.elapsed().as_secs_f64());
        let moved = moved.load(Ordering::Relaxed);
        let written = (image.manifest_bytes) * self.destinations.len() as u64;
        if self.counting != Counting::Received {
            summary.bytes_sent = moved + written;
        }
        if self.counting != Counting::Sent {
            summary.bytes_received = moved + image.manifest_bytes;
        }
        Ok(Copied {
            manifest: image.descriptor(),
            targets: outcomes,
            summary,
        })
    }

    /// Copies to one destination; `Ok(true)` when it had the whole image and
    /// only the tag was written.
    #[allow(clippy::too_many_arguments)]
    async fn copy_to(
        &self,
        image: &SourceImage,
        destination: &Destination,
        mount_from: &[(String, String)],
        options: &TransferOptions,
        progress: &Arc<dyn Progress>,
        counters: &Counters,
        moved: &Arc<AtomicU64>,
        gate: Option<&BlobGate>,
    ) -> Result<bool, TransferError> {
        let t = destination.transport.as_ref();
        let location = t.location();
        let blobs: Vec<&Descriptor> = image
            .blobs
            .iter()
            .filter(|b| !self.withheld.contains(&b.digest))
            .collect();
        if let Some(gate) = gate {
            for blob in image
                .blobs
                .iter()
                .filter(|b| self.withheld.contains(&b.digest))
            {
                gate.withhold(
                    &blob.digest,
                    format!(
                        "{}: blob {} {}",
                        self.image,
                        blob.digest,
                        crate::gate::WITHHELD
                    ),
                );
            }
        }
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        progress.event(&Event::Start {
            image: &destination.name,
            blobs: blobs.len(),
            bytes: total,
        });
        let sources: Vec<&str> = mount_from
            .iter()
            .filter(|(l, r)| *l == location && *r != destination.repository)
            .map(|(_, r)| r.as_str())
            .collect();
        // One token for the destination and every mount source.
        t.will_access(&destination.repository, Access::Push);
        for from in &sources {
            t.will_access(from, Access::Pull);
        }
        let contents = image.contents();
        let (holds, _) = retrying(options, &destination.name, |_| async {
            Ok(
                t.holds_image(&destination.repository, &image.manifest, &contents)
                    .await?,
            )
        })
        .await;
        let manifest_only = holds?;
        if manifest_only {
            tracing::info!(
                "{}: holds {}; writing the tag only",
                destination.name,
                image.manifest.digest
            );
            for blob in &blobs {
                counters.skip(blob, false, progress.as_ref());
                if let Some(gate) = gate {
                    gate.ready(&blob.digest, false);
                }
            }
        } else {
            futures_util::stream::iter(blobs.iter().copied())
                .map(|blob| {
                    let sources = &sources;
                    async move {
                        let verified = self
                            .copy_blob(
                                blob,
                                destination,
                                sources,
                                options,
                                progress,
                                counters,
                                moved,
                            )
                            .await?;
                        if let Some(gate) = gate {
                            gate.ready(&blob.digest, verified);
                        }
                        Ok::<(), TransferError>(())
                    }
                })
                .buffer_unordered(options.concurrency.max(1))
                .try_collect::<Vec<()>>()
                .await?;
            for child in &image.children {
                let (result, _) = retrying(options, &destination.name, |_| async {
                    Ok(destination
                        .transport
                        .put_child_manifest(&destination.repository, child)
                        .await?)
                })
                .await;
                result?;
            }
        }
        // Before the image is finished: an archive is closed then.
        self.attach(image, destination, options).await?;
        if self.blobs_only {
            return Ok(manifest_only);
        }
        let reference = destination
            .tag
            .clone()
            .unwrap_or_else(|| image.manifest.digest.to_string());
        self.put_manifest(destination, &reference, &image.manifest, options)
            .await?;
        t.finish_image(&destination.repository, &reference).await?;
        Ok(manifest_only)
    }

    async fn put_manifest(
        &self,
        destination: &Destination,
        reference: &str,
        manifest: &RawManifest,
        options: &TransferOptions,
    ) -> Result<(), TransferError> {
        let (result, _) = retrying(options, &destination.name, |_| async {
            Ok(destination
                .transport
                .put_manifest(&destination.repository, reference, manifest)
                .await?)
        })
        .await;
        result
    }

    /// Makes `blob` present at the destination; `Ok(true)` when it was moved
    /// (and so verified) now, `Ok(false)` when it was there, linked or mounted.
    #[allow(clippy::too_many_arguments)]
    async fn copy_blob(
        &self,
        blob: &Descriptor,
        destination: &Destination,
        mount_sources: &[&str],
        options: &TransferOptions,
        progress: &Arc<dyn Progress>,
        counters: &Counters,
        moved: &Arc<AtomicU64>,
    ) -> Result<bool, TransferError> {
        let t = destination.transport.as_ref();
        let what = format!("{}: blob {}", destination.name, blob.digest);
        let skip = |mounted: bool| counters.skip(blob, mounted, progress.as_ref());
        if !mount_sources.is_empty() {
            let (exists, retries) = retrying(options, &what, |_| async {
                Ok(t.blob_exists(&destination.repository, blob).await?)
            })
            .await;
            counters.retries.fetch_add(retries, Ordering::Relaxed);
            if exists? {
                skip(false);
                return Ok(false);
            }
            for from in mount_sources {
                let (mounted, _) = retrying(options, &what, |_| async {
                    Ok(t.mount_blob(&destination.repository, from, blob).await?)
                })
                .await;
                match mounted {
                    Ok(true) => {
                        tracing::debug!("{what}: mounted from {from}");
                        skip(true);
                        return Ok(false);
                    }
                    Ok(false) => {}
                    // A refused mount is no reason to fail: copy instead.
                    Err(e) => tracing::debug!("{what}: mount from {from} failed: {e}"),
                }
            }
        }
        let result = self
            .write_blob(blob, destination, options, progress, counters, moved)
            .await;
        match result? {
            BlobOutcome::Present { linked } => {
                skip(linked);
                Ok(false)
            }
            BlobOutcome::Written => {
                counters.transferred.fetch_add(1, Ordering::Relaxed);
                progress.event(&Event::Done {
                    digest: &blob.digest,
                    size: blob.size,
                });
                Ok(true)
            }
        }
    }

    /// Writes a blob through the destination's sink, streaming the source
    /// into it from where the sink resumes. A transient failure is retried
    /// with the same sink, from what it kept (nothing is read twice from the
    /// source or from disk); a resumed blob that fails its digest is written
    /// once more from the start (the kept bytes may be the damaged part).
    async fn write_blob(
        &self,
        blob: &Descriptor,
        destination: &Destination,
        options: &TransferOptions,
        progress: &Arc<dyn Progress>,
        counters: &Counters,
        moved: &Arc<AtomicU64>,
    ) -> Result<BlobOutcome, TransferError> {
        let t = destination.transport.as_ref();
        let what = format!("{}: blob {}", destination.name, blob.digest);
        let (started, retries) = retrying(options, &what, |_| async {
            Ok(t.start_blob_write(&destination.repository, blob).await?)
        })
        .await;
        counters.retries.fetch_add(retries, Ordering::Relaxed);
        let mut sink = match started? {
            BlobWrite::Present { linked } => return Ok(BlobOutcome::Present { linked }),
            BlobWrite::Write(sink) => sink,
        };
        let kept = sink.offset();
        if kept > 0 {
            progress.event(&Event::Bytes {
                digest: &blob.digest,
                n: kept.min(blob.size),
            });
        }
        let mut attempt = 0u32;
        let mut started_over = false;
        loop {
            let offset = sink.offset();
            let result = self
                .write_once(blob, sink.as_mut(), offset, progress, moved)
                .await;
            let e = match result {
                Ok(()) => return Ok(BlobOutcome::Written),
                Err(e) => e,
            };
            let resumed_wrong = offset > 0
                && matches!(
                    &e,
                    TransferError::Transport(TransportError::Mismatch { what: "digest", .. })
                );
            if resumed_wrong && !started_over {
                tracing::warn!(
                    "{what}: did not verify after resuming at byte {offset} ({e}); writing it again from the start"
                );
                started_over = true;
                continue;
            }
            if !e.is_transient() || attempt >= options.retries {
                return Err(e);
            }
            if !options.retry_budget.take() {
                return Err(options.retry_budget.give_up(e));
            }
            let wait = e.retry_after().unwrap_or_else(|| backoff(options, attempt));
            let message = format!(
                "{what}: {e}; retrying in {:.1}s ({}/{})",
                wait.as_secs_f64(),
                attempt + 1,
                options.retries
            );
            tracing::warn!("{message}");
            progress.event(&Event::Retry { message: &message });
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
            attempt += 1;
            // A sink that keeps nothing (a registry upload whose answer never
            // came) may have stored the blob all the same: don't send it twice.
            if sink.offset() == 0
                && t.blob_exists(&destination.repository, blob)
                    .await
                    .unwrap_or(false)
            {
                return Ok(BlobOutcome::Written);
            }
        }
    }

    /// One request to the source, streamed into the sink from `offset`.
    async fn write_once(
        &self,
        blob: &Descriptor,
        sink: &mut (dyn BlobSink + '_),
        offset: u64,
        progress: &Arc<dyn Progress>,
        moved: &Arc<AtomicU64>,
    ) -> Result<(), TransferError> {
        if offset > blob.size {
            return Err(TransferError::Transport(TransportError::Protocol {
                location: self.source.location(),
                message: format!(
                    "the destination resumes blob {} at byte {offset}, past its {} bytes",
                    blob.digest, blob.size
                ),
            }));
        }
        let data = self.source.get_blob(&self.repository, blob, offset).await?;
        let failure = ReadFailure::slot();
        let reader = VerifyingReader::new(
            tokio::io::BufReader::with_capacity(1 << 20, data),
            blob.clone(),
            offset,
            !sink.verifies_digest(),
            self.source.location(),
            progress.clone(),
            moved.clone(),
            failure.clone(),
        );
        let Err(e) = sink.write(Box::pin(reader)).await else {
            return Ok(());
        };
        let failure = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
        Err(match failure {
            Some(ReadFailure::Broke { received, error }) => TransferError::Stream {
                location: self.source.location(),
                digest: blob.digest.clone(),
                received,
                source: error,
            },
            Some(ReadFailure::Mismatch { what, actual }) => {
                TransferError::Verify(Box::new(VerifyFailure {
                    image: self.image.clone(),
                    location: self.source.location(),
                    digest: blob.digest.clone(),
                    what,
                    expected: match what {
                        "size" => blob.size.to_string(),
                        _ => blob.digest.to_string(),
                    },
                    actual,
                }))
            }
            // The sink's own digest check of a blob streamed whole: the source's
            // content is wrong, as the reader would have said.
            None if offset == 0
                && matches!(&e, TransportError::Mismatch { what: "digest", .. }) =>
            {
                let TransportError::Mismatch { actual, .. } = e else {
                    unreachable!("matched above")
                };
                TransferError::Verify(Box::new(VerifyFailure {
                    image: self.image.clone(),
                    location: self.source.location(),
                    digest: blob.digest.clone(),
                    what: "digest",
                    expected: blob.digest.to_string(),
                    actual,
                }))
            }
            None => e.into(),
        })
    }
}

enum BlobOutcome {
    Present { linked: bool },
    Written,
}

/// Writes a small blob held in memory (an attachment's).
async fn put_small_blob(
    transport: &dyn Transport,
    repository: &str,
    blob: &Descriptor,
    bytes: Vec<u8>,
) -> Result<(), TransferError> {
    let reader: sarde_api::transport::BlobReader = Box::pin(std::io::Cursor::new(bytes));
    Ok(transport.put_blob(repository, blob, reader).await?)
}
