//! `sarde import`: an image from the local OCI layout into a libvirt VM.
//!
//! Everything is verified before the VM exists: every blob by size and digest as it
//! streams, every decompressed piece by size and digest, the domain XML against the
//! rules for untrusted input. Files are written into a staging directory, which is
//! renamed into place only when complete; the domain is defined last. An interrupted
//! or failed import therefore leaves no VM and no partial disk, and running it again
//! completes it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sarde_api::Hypervisor;
use sarde_api::digest::Digest;
use sarde_api::oci::{Descriptor, ImageManifest};
use sarde_format::native::{self, NativeImage};
use sarde_format::v1::{self, V1Image};
use sarde_format::{FileRole, Format};
use sarde_transfer::BlobGate;
use sarde_transport_oci_dir::Layout;
use sha2::{Digest as _, Sha256};

use crate::blobs::Blobs;
use crate::marker::{FileRecord, FileStamp, Marker, Region};
use crate::update::PreviousVersions;
use crate::verify::VerifyingReader;
use crate::{Engine, EngineError, ImageLocation, Result, gzip_header, read_full};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub image: ImageLocation,
    /// VM name; the image id (config digest) when `None`.
    pub name: Option<String>,
    /// Replace an existing VM of that name that is not this image.
    pub replace: bool,
    /// Keep domain XML that reaches outside the VM (host devices, host paths…).
    pub allow_unsafe_xml: bool,
    /// The image is still arriving (pull): read its manifest from here and wait
    /// for each blob; `None` reads a complete image from the layout.
    pub incoming: Option<Incoming>,
    /// Who imports it for its own use (recorded, so it can remove its own VMs).
    pub imported_by: Option<String>,
}

/// An image whose blobs a fetch is still writing into the layout.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub gate: Arc<BlobGate>,
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportOutcome {
    pub name: String,
    pub uuid: String,
    pub image_id: Digest,
    pub directory: PathBuf,
    /// False when the VM already existed from the same image and was left alone.
    pub created: bool,
    /// Bytes decompressed from the image's blobs and written.
    pub bytes_written: u64,
    /// Bytes of unchanged pieces copied from an earlier version's files instead.
    pub bytes_copied: u64,
    /// The earlier imports those pieces came from.
    pub copied_from: Vec<String>,
}

/// What an import took from earlier versions instead of the blobs.
#[derive(Default)]
struct Copied {
    bytes: u64,
    from: Vec<String>,
}

/// An image read from the layout and checked.
pub(crate) struct LoadedImage {
    pub manifest_descriptor: Descriptor,
    pub config_digest: Digest,
    pub content: Content,
}

pub(crate) enum Content {
    Native(NativeImage),
    V1(V1Image),
}

impl Content {
    pub fn domain_xml(&self) -> &Descriptor {
        match self {
            Content::Native(n) => &n.common.domain_xml,
            Content::V1(v) => &v.common.domain_xml,
        }
    }

    pub fn vm_config(&self) -> Option<&Descriptor> {
        match self {
            Content::Native(n) => n.common.vm_config.as_ref(),
            Content::V1(v) => v.common.vm_config.as_ref(),
        }
    }
}

/// Reads manifest and config of `image` from `layout` (both verified) and parses them.
pub(crate) fn load_image(layout: &Layout, image: &ImageLocation) -> Result<LoadedImage> {
    let manifest_descriptor = layout.resolve(&image.reference)?;
    let bytes = layout.read_blob(&manifest_descriptor)?;
    parse_image(
        &Blobs { layout, gate: None },
        image,
        manifest_descriptor,
        &bytes,
    )
}

/// Reads an image from its manifest bytes; the config blob may still be arriving.
fn parse_image(
    layout: &Blobs<'_>,
    image: &ImageLocation,
    manifest_descriptor: Descriptor,
    bytes: &[u8],
) -> Result<LoadedImage> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| {
        EngineError::Refused(format!(
            "{}: manifest {} is not an OCI image manifest: {e}",
            image.name, manifest_descriptor.digest
        ))
    })?;
    let config_bytes = layout.read_blob(&manifest.config)?;
    let config = sarde_format::parse_config(&manifest, &config_bytes)?;
    let content = match Format::detect(&manifest) {
        Format::Native => {
            // The config (whose digest is the image id, and names the VM) must
            // commit to the content, as sarde writes it: a diff_id per layer,
            // a piece's being the digest of its uncompressed bytes (which the
            // import verifies). Else two images with one config, one signed
            // and one not, would share a VM.
            let content_ids: Vec<String> = manifest
                .layers
                .iter()
                .map(|l| {
                    l.annotation(sarde_format::native::annotations::PIECE_DIGEST)
                        .map_or_else(|| l.digest.to_string(), str::to_string)
                })
                .collect();
            let diff_ids: Vec<String> = config
                .rootfs
                .diff_ids
                .iter()
                .map(Digest::to_string)
                .collect();
            if diff_ids != content_ids {
                return Err(EngineError::Refused(format!(
                    "{}: manifest {}: the config's rootfs.diff_ids do not list the image's layers, so its id would not identify its content: refused",
                    image.name, manifest_descriptor.digest
                )));
            }
            Content::Native(native::parse(&manifest)?)
        }
        Format::V1 => Content::V1(v1::parse(&manifest, &config)?),
    };
    Ok(LoadedImage {
        manifest_descriptor,
        config_digest: manifest.config.digest.clone(),
        content,
    })
}

/// Holds the lock on `<vmdir>/.<name>.lock`: exclusive for the import (and the
/// removal) of one VM name, shared by clones of it. The lock goes with the file
/// when this is dropped.
pub(crate) struct NameLock {
    _file: File,
}

impl NameLock {
    fn acquire(vmdir: &Path, name: &str) -> Result<NameLock> {
        Self::take(vmdir, name, libc::LOCK_EX)
    }

    /// The lock shared, waiting for an import of the name to finish.
    pub(crate) fn shared(vmdir: &Path, name: &str) -> Result<NameLock> {
        Self::take(vmdir, name, libc::LOCK_SH)
    }

    /// The lock shared if no import or removal holds it now; `None` otherwise.
    pub(crate) fn try_shared(vmdir: &Path, name: &str) -> Option<NameLock> {
        Self::take(vmdir, name, libc::LOCK_SH | libc::LOCK_NB).ok()
    }

    /// The lock exclusive if nobody holds it now (a removal of the VM); `None`
    /// when an import or clone of it runs, or the lock cannot be opened.
    pub(crate) fn try_exclusive(vmdir: &Path, name: &str) -> Option<NameLock> {
        Self::take(vmdir, name, libc::LOCK_EX | libc::LOCK_NB).ok()
    }

    fn take(vmdir: &Path, name: &str, mode: libc::c_int) -> Result<NameLock> {
        let path = vmdir.join(format!(".{name}.lock"));
        // Created when missing, so an import or clone starting now meets this lock.
        let file = File::options()
            .create(true)
            .truncate(false)
            // Readable too: a shared lock on NFS needs it.
            .read(true)
            .write(true)
            .open(&path)
            .map_err(EngineError::io(&path, "creating the VM name lock"))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), mode) } == 0 {
                return Ok(NameLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(EngineError::io(&path, "locking")(e));
            }
        }
    }
}

impl Engine {
    /// Imports an image from the local cache as a VM.
    pub fn import(&self, request: &ImportRequest) -> Result<ImportOutcome> {
        // The image stays in the cache while it is read.
        let _lease = self.lease_image("import", &request.image, false)?;
        let outcome = self.import_leased(request)?;
        self.record_vm_use(&outcome.name);
        Ok(outcome)
    }

    fn import_leased(&self, request: &ImportRequest) -> Result<ImportOutcome> {
        let layout = self.layout(&request.image)?;
        let image = match &request.incoming {
            None => load_image(&layout, &request.image)?,
            Some(incoming) => {
                let actual = Digest::sha256_of(&incoming.manifest_bytes);
                if actual != incoming.manifest.digest {
                    return Err(EngineError::Refused(format!(
                        "{}: manifest bytes have digest {actual}, expected {}",
                        request.image.name, incoming.manifest.digest
                    )));
                }
                let blobs = Blobs {
                    layout: &layout,
                    gate: Some(&incoming.gate),
                };
                parse_image(
                    &blobs,
                    &request.image,
                    incoming.manifest.clone(),
                    &incoming.manifest_bytes,
                )?
            }
        };
        let layout = Blobs {
            layout: &layout,
            gate: request.incoming.as_ref().map(|i| &*i.gate),
        };
        self.record_image_use(&request.image, &image.manifest_descriptor.digest);
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| image.config_digest.to_string());
        check_vm_name(&name)?;
        fs::create_dir_all(&self.vmdir)
            .map_err(EngineError::io(&self.vmdir, "creating the VM directory"))?;
        let _lock = NameLock::acquire(&self.vmdir, &name)?;
        let hypervisor = self.registry.connect(&self.connect)?;
        let final_dir = self.vmdir.join(&name);

        let mut replace_existing = false;
        if hypervisor.exists(&name)? {
            let marker = Marker::read(&final_dir);
            let same = marker
                .as_ref()
                .is_some_and(|m| m.config == image.config_digest);
            if same && self.intact(&final_dir, marker.as_ref().expect("checked"))? {
                return Ok(ImportOutcome {
                    uuid: uuid_of(hypervisor.as_ref(), &name)?,
                    name,
                    image_id: image.config_digest,
                    directory: final_dir,
                    created: false,
                    bytes_written: 0,
                    bytes_copied: 0,
                    copied_from: Vec::new(),
                });
            }
            if marker.is_none() {
                return Err(EngineError::Refused(format!(
                    "VM {name:?} already exists and was not imported by sarde; sarde never replaces it: import under another name (-n)"
                )));
            }
            if !request.replace {
                let why = if same {
                    "its disks no longer match the image"
                } else {
                    "it was imported from another image"
                };
                return Err(EngineError::Refused(format!(
                    "VM {name:?} already exists and {why}; pass --replace to replace it, or -n to import under another name"
                )));
            }
            // Replaced only once the new image is complete and verified.
            replace_existing = true;
        } else if final_dir.exists() {
            match Marker::read(&final_dir) {
                None => {
                    return Err(EngineError::Refused(format!(
                        "{} exists but was not made by sarde; move it away or import under another name (-n)",
                        final_dir.display()
                    )));
                }
                Some(m) if m.defined && !request.replace => {
                    return Err(EngineError::Refused(format!(
                        "{} holds VM {name:?} imported by sarde, but no such domain is defined on {}; pass --replace to overwrite its files",
                        final_dir.display(),
                        self.connect
                    )));
                }
                // Left by an import interrupted between moving its files into
                // place and defining the domain, or replaced on request.
                Some(_) => fs::remove_dir_all(&final_dir)
                    .map_err(EngineError::io(&final_dir, "removing a stale import"))?,
            }
        }

        if request.incoming.is_none()
            && image
                .manifest_descriptor
                .annotation(sarde_transport_oci_dir::ANNOTATION_BLOBS)
                == Some(sarde_transport_oci_dir::BLOBS_METADATA_ONLY)
        {
            return Err(EngineError::Refused(format!(
                "{} is kept in the cache without its disk pieces (it was pulled with keep-blobs = false, for VMs it no longer has): `sarde pull` it, which fetches the pieces this host lacks",
                request.image.name
            )));
        }
        // A pull made room for the whole image before it started.
        if request.incoming.is_none() {
            let need = crate::lifecycle::SpaceNeed {
                cache: 0,
                vms: match &image.content {
                    Content::Native(n) => {
                        n.files.iter().flat_map(|f| &f.pieces).map(|p| p.size).sum()
                    }
                    Content::V1(v1) => v1.files.iter().map(|f| f.compressed_size()).sum(),
                },
            };
            self.make_room(need, &request.image, Some(&name))?;
        }

        // A staging directory left by an interrupted import of the same image is
        // resumed: pieces already written and verified are kept.
        let staging = self.vmdir.join(format!(".staging-{name}"));
        let stamp = staging.join(STAGING_STAMP);
        let resume = fs::read_to_string(&stamp).is_ok_and(|s| s == image.config_digest.to_string())
            && matches!(image.content, Content::Native(_));
        if !resume {
            if staging.exists() {
                fs::remove_dir_all(&staging).map_err(EngineError::io(
                    &staging,
                    "removing a stale staging directory",
                ))?;
            }
            fs::create_dir(&staging)
                .map_err(EngineError::io(&staging, "creating the staging directory"))?;
            fs::write(&stamp, image.config_digest.to_string())
                .map_err(EngineError::io(&stamp, "writing"))?;
        } else {
            tracing::info!("resuming the interrupted import in {}", staging.display());
        }
        let result = self.import_into(
            &layout,
            &image,
            request,
            replace_existing,
            &name,
            &staging,
            &final_dir,
            hypervisor.as_ref(),
        );
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn import_into(
        &self,
        layout: &Blobs<'_>,
        image: &LoadedImage,
        request: &ImportRequest,
        replace_existing: bool,
        name: &str,
        staging: &Path,
        final_dir: &Path,
        hypervisor: &dyn Hypervisor,
    ) -> Result<ImportOutcome> {
        // The domain XML first: a hostile image is refused before any disk is written.
        let xml = String::from_utf8(layout.read_blob(image.content.domain_xml())?)
            .map_err(|_| EngineError::Refused("the domain XML layer is not UTF-8 text".into()))?;
        let mut copied = Copied::default();
        let (records, bytes_written) = match &image.content {
            Content::Native(native) => {
                self.check_xml(
                    &xml,
                    native.files.iter().map(|f| f.spec.name.as_str()),
                    request,
                )?;
                let previous = self.previous_versions(&request.image.name, name, &native.files)?;
                copied.from = previous.vms.clone();
                self.write_native(layout, native, staging, &previous, &mut copied)?
            }
            Content::V1(v1) => {
                let (records, bytes) = self.write_v1(layout, v1, staging)?;
                self.check_xml(&xml, records.iter().map(|r| r.name.as_str()), request)?;
                (records, bytes)
            }
        };
        let files: BTreeMap<String, PathBuf> = records
            .iter()
            .map(|r| (r.name.clone(), final_dir.join(&r.name)))
            .collect();
        let nvram_path = match &image.content {
            Content::Native(n) => n
                .files
                .iter()
                .find(|f| f.spec.role == FileRole::Nvram)
                .map(|f| final_dir.join(&f.spec.name)),
            Content::V1(_) => None,
        };
        let nvram = nvram_path.clone();
        let domain_xml = sarde_domain::prepare_import(
            &xml,
            &sarde_domain::ImportSpec {
                name: name.to_string(),
                files,
                nvram,
                keep_uuid: false,
            },
        )?;
        if !request.allow_unsafe_xml {
            let own: Vec<String> = files_and_nvram(&records, final_dir, nvram_path.as_deref());
            let own: Vec<&str> = own.iter().map(String::as_str).collect();
            sarde_domain::check_host_paths(&domain_xml, &own)?;
        }
        let marker = Marker {
            image: request.image.name.clone(),
            manifest: image.manifest_descriptor.digest.clone(),
            config: image.config_digest.clone(),
            vm_name: name.to_string(),
            files: records,
            defined: false,
            imported_by: request.imported_by.clone(),
        };
        marker
            .write(staging)
            .map_err(EngineError::io(staging, "writing the import record"))?;
        sync_dir(staging)?;
        if replace_existing {
            self.remove_vm(hypervisor, name, final_dir)?;
        }
        fs::rename(staging, final_dir).map_err(EngineError::io(
            final_dir,
            "moving the imported files into place",
        ))?;
        sync_dir(&self.vmdir)?;
        if let Err(e) = hypervisor.define(&domain_xml) {
            let _ = fs::remove_dir_all(final_dir);
            return Err(e.into());
        }
        // From now on the directory belongs to a defined VM: never removed silently.
        let mut marker = Marker {
            defined: true,
            ..marker
        };
        for file in &mut marker.files {
            file.stamp = FileStamp::of(&final_dir.join(&file.name)).ok();
        }
        marker
            .write(final_dir)
            .map_err(EngineError::io(final_dir, "updating the import record"))?;
        Ok(ImportOutcome {
            uuid: uuid_of(hypervisor, name)?,
            name: name.to_string(),
            image_id: image.config_digest.clone(),
            directory: final_dir.to_path_buf(),
            created: true,
            bytes_written,
            bytes_copied: copied.bytes,
            copied_from: copied.from,
        })
    }

    fn check_xml<'a>(
        &self,
        xml: &str,
        names: impl Iterator<Item = &'a str>,
        request: &ImportRequest,
    ) -> Result<()> {
        let allowed: Vec<&str> = names.collect();
        match sarde_domain::check_untrusted(xml, &allowed) {
            Ok(()) => Ok(()),
            Err(unsafe_xml) if request.allow_unsafe_xml => {
                tracing::warn!(
                    "importing domain XML that reaches outside the VM, as --allow-unsafe-xml asks: {unsafe_xml}"
                );
                Ok(())
            }
            Err(unsafe_xml) => Err(unsafe_xml.into()),
        }
    }

    /// Decompresses all pieces of all files in parallel, each straight to its
    /// offset; pieces an earlier version holds are copied from it instead.
    fn write_native(
        &self,
        layout: &Blobs<'_>,
        image: &NativeImage,
        staging: &Path,
        previous: &PreviousVersions,
        copied: &mut Copied,
    ) -> Result<(Vec<FileRecord>, u64)> {
        // Holes cost nothing; every stored piece is written in full. Refuse up front
        // what cannot fit (a small image can announce terabytes).
        let needed: u64 = image
            .files
            .iter()
            .flat_map(|f| &f.pieces)
            .map(|p| p.size)
            .sum();
        let available = sarde_lifecycle::space::free_space(staging)?;
        if needed > available {
            return Err(EngineError::Refused(format!(
                "the image needs {needed} bytes of disk in {}, only {available} are free",
                staging.display()
            )));
        }
        let mut files = Vec::new();
        // Pieces go to disk without the page cache where the file system allows.
        let mut direct: Vec<Option<File>> = Vec::new();
        let mut jobs = Vec::new();
        // Pieces whose bytes this import hashed: (file index, offset).
        let verified: Mutex<std::collections::HashSet<(usize, u64)>> = Mutex::default();
        for (index, file) in image.files.iter().enumerate() {
            let path = staging.join(&file.spec.name);
            let resumable = fs::metadata(&path).is_ok_and(|m| m.len() == file.spec.size);
            let done = if resumable {
                let spans: Vec<sarde_disk::PieceSpan> = file
                    .pieces
                    .iter()
                    .map(|p| sarde_disk::PieceSpan {
                        offset: p.offset,
                        length: p.size,
                        digest: p.digest.clone(),
                    })
                    .collect();
                files.push(
                    File::options()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(EngineError::io(&path, "reopening to resume"))?,
                );
                sarde_disk::verify_pieces(&path, &spans, self.effective_threads())?
            } else {
                if path.exists() {
                    fs::remove_file(&path).map_err(EngineError::io(&path, "removing"))?;
                }
                files.push(sarde_disk::create_sparse(&path, file.spec.size)?);
                vec![false; file.pieces.len()]
            };
            direct.push(sarde_disk::open_direct(&path));
            for (piece, done) in file.pieces.iter().zip(done) {
                if done {
                    // Hashed just now by the resume's check.
                    verified
                        .lock()
                        .expect("not poisoned")
                        .insert((index, piece.offset));
                    continue;
                }
                if resumable {
                    // A piece cut short by the interruption: clear it before rewriting.
                    sarde_disk::zero_range(&files[index], piece.offset, piece.size)?;
                }
                jobs.push((index, piece));
            }
        }
        tracing::debug!(pieces = jobs.len(), "pieces to write");
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<EngineError>> = Mutex::new(None);
        let written = AtomicUsize::new(0);
        let copied_bytes = AtomicUsize::new(0);
        // Pieces copied from each earlier file, checked again if it changed meanwhile.
        let copies: Mutex<Vec<(usize, &native::Piece, u64)>> = Mutex::new(Vec::new());
        let verified_now = |file_index: usize, piece: &native::Piece| {
            verified
                .lock()
                .expect("not poisoned")
                .insert((file_index, piece.offset));
        };
        std::thread::scope(|scope| {
            for _ in 0..self.disk_bound_threads().min(jobs.len().max(1)) {
                scope.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(file_index, piece)) = jobs.get(i) else {
                            break;
                        };
                        let spec = &image.files[file_index].spec;
                        if let Some(from) =
                            previous.files[file_index].as_ref().filter(|f| f.holds(piece))
                        {
                            let hash = from.needs_hash(piece);
                            let why = match sarde_disk::copy_range(
                                &from.file,
                                &files[file_index],
                                piece.offset,
                                piece.size,
                                hash,
                            ) {
                                Ok((bytes, digest))
                                    if digest.as_ref().is_none_or(|d| *d == piece.digest) =>
                                {
                                    copied_bytes.fetch_add(bytes as usize, Ordering::Relaxed);
                                    verified_now(file_index, piece);
                                    if !hash {
                                        copies
                                            .lock()
                                            .expect("not poisoned")
                                            .push((file_index, piece, bytes));
                                    }
                                    continue;
                                }
                                Ok(_) => "it does not hold what its import record says".to_string(),
                                Err(e) => format!("copying failed: {e}"),
                            };
                            tracing::warn!(
                                "{}: the piece at offset {} cannot come from {} ({why}); writing it from its blob",
                                spec.name,
                                piece.offset,
                                from.path.display()
                            );
                            if let Err(e) =
                                sarde_disk::zero_range(&files[file_index], piece.offset, piece.size)
                            {
                                failed.store(true, Ordering::Relaxed);
                                first_error
                                    .lock()
                                    .expect("not poisoned")
                                    .get_or_insert(e.into());
                                continue;
                            }
                        }
                        match self.write_native_piece(
                            layout,
                            &files[file_index],
                            direct[file_index].as_ref(),
                            spec,
                            piece,
                        ) {
                            Ok(hashed) => {
                                if hashed {
                                    verified_now(file_index, piece);
                                }
                                written.fetch_add(piece.size as usize, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error.lock().expect("not poisoned").get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("not poisoned") {
            return Err(e);
        }
        // A file that changed while pieces were copied from it: the copies are
        // hashed, and a piece that no longer matches is written from its blob.
        for (file_index, piece, bytes) in copies.into_inner().expect("not poisoned") {
            let from = previous.files[file_index].as_ref().expect("copied from it");
            if from.unchanged_since_check() {
                continue;
            }
            let path = staging.join(&image.files[file_index].spec.name);
            let span = sarde_disk::PieceSpan {
                offset: piece.offset,
                length: piece.size,
                digest: piece.digest.clone(),
            };
            if sarde_disk::verify_pieces(&path, &[span], 1)? == [true] {
                continue;
            }
            tracing::warn!(
                "{} changed while the piece at offset {} was copied from it; writing it from its blob",
                from.path.display(),
                piece.offset
            );
            copied_bytes.fetch_sub(bytes as usize, Ordering::Relaxed);
            sarde_disk::zero_range(&files[file_index], piece.offset, piece.size)?;
            let spec = &image.files[file_index].spec;
            if !self.write_native_piece(layout, &files[file_index], None, spec, piece)? {
                verified
                    .lock()
                    .expect("not poisoned")
                    .remove(&(file_index, piece.offset));
            }
            written.fetch_add(piece.size as usize, Ordering::Relaxed);
        }
        copied.bytes = copied_bytes.into_inner() as u64;
        for (file, spec) in files.iter().zip(&image.files) {
            file.sync_all()
                .map_err(EngineError::io(&staging.join(&spec.spec.name), "syncing"))?;
        }
        // The headers must say what the image announced before qemu touches them.
        for file in &image.files {
            let path = staging.join(&file.spec.name);
            check_header(&path, Some(&file.spec.format), |_| {
                file.spec.backing.is_some()
            })?;
        }
        // Point each overlay at its imported backing file.
        let mut rebased = Vec::new();
        for file in &image.files {
            if let Some(backing) = &file.spec.backing {
                let format = image.file(backing).map(|b| b.spec.format.as_str());
                sarde_disk::rebase_in_place(&staging.join(&file.spec.name), Some(backing), format)?;
                rebased.push(file.spec.name.as_str());
            }
        }
        let verified = verified.into_inner().expect("not poisoned");
        let mut records = Vec::new();
        for (index, f) in image.files.iter().enumerate() {
            let path = staging.join(&f.spec.name);
            let mut regions = Vec::new();
            for p in &f.pieces {
                // A rebase rewrites the header, so record what the file holds now.
                let rehashed = rebased.contains(&f.spec.name.as_str()) && p.offset < REBASE_REACH;
                let digest = if rehashed {
                    hash_range(&path, p.offset, p.size)?
                } else {
                    p.digest.clone()
                };
                regions.push(Region {
                    offset: p.offset,
                    size: p.size,
                    digest,
                    verified: rehashed || verified.contains(&(index, p.offset)),
                });
            }
            records.push(FileRecord {
                name: f.spec.name.clone(),
                size: f.spec.size,
                regions,
                stamp: None,
            });
        }
        Ok((records, written.into_inner() as u64))
    }

    fn write_native_piece(
        &self,
        layout: &Blobs<'_>,
        file: &File,
        direct: Option<&File>,
        spec: &native::FileSpec,
        piece: &native::Piece,
    ) -> Result<bool> {
        let codec = self.registry.codec_for_suffix(piece.suffix.as_deref()).ok_or_else(|| {
            EngineError::Refused(format!(
                "{}: piece at offset {} is compressed with {}, which no registered codec reads; load the plugin that provides it (sarde plugins lists what is loaded)",
                spec.name,
                piece.offset,
                piece.suffix.as_deref().unwrap_or("(none)")
            ))
        })?;
        let blob = Descriptor::new("", piece.blob.clone(), piece.blob_size);
        let raw = layout.open_blob(&blob)?;
        let what = format!("{} piece at offset {}", spec.name, piece.offset);
        let verify = if layout.verified_now(&piece.blob) {
            VerifyingReader::size_only
        } else {
            VerifyingReader::new
        };
        // Read once, right after it landed: past the page cache.
        let mut verifying = verify(
            sarde_transport_oci_dir::DirectReader::new(raw),
            piece.blob.clone(),
            piece.blob_size,
            what.clone(),
        );
        // The blob's digest is verified (by this pull's download a moment ago, or
        // while this reads it, its failure winning). The decoded bytes are then
        // checked by the codec's own checksum where it writes one, or are the blob
        // itself (a stored piece announcing its blob's digest): a sha256 of them
        // would catch nothing more. Other codecs' output is hashed; digests other
        // than sha256 are refused there.
        let stored_as_is = piece.suffix.is_none() && piece.digest == piece.blob;
        let hash_decoded = !(codec.checks_decoded() || stored_as_is)
            || piece.digest.algorithm() != sarde_api::digest::Algorithm::Sha256;
        let expected = hash_decoded.then_some(&piece.digest);
        let written = {
            let mut decoder = codec.decoder(Box::new(&mut verifying))?;
            sarde_disk::write_piece_direct(
                file,
                direct,
                piece.offset,
                piece.size,
                expected,
                &mut decoder,
            )
        };
        // The blob's own digest is the most precise diagnosis: check it first, also
        // when decoding failed (a flipped bit usually trips the codec's checksum).
        let blob_check = verifying.finish();
        match (written, blob_check) {
            (_, Err(e)) => Err(EngineError::Refused(e.to_string())),
            (Err(e), Ok(())) => Err(e.into()),
            (Ok(()), Ok(())) => Ok(expected.is_some()),
        }
    }

    /// v1: each file is one gzip stream across its pieces; files decompress in parallel.
    fn write_v1(
        &self,
        layout: &Blobs<'_>,
        image: &V1Image,
        staging: &Path,
    ) -> Result<(Vec<FileRecord>, u64)> {
        let gzip = self
            .registry
            .codec_for_suffix(Some("+gzip"))
            .ok_or_else(|| {
                EngineError::Refused(
                    "v1 images need the gzip codec, which is not registered".into(),
                )
            })?;
        let next = AtomicUsize::new(0);
        type FileResult = Result<(FileRecord, u64)>;
        let results: Mutex<Vec<(usize, FileResult)>> = Mutex::new(Vec::new());
        let failed = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..self.effective_threads().min(image.files.len().max(1)) {
                scope.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = image.files.get(i) else {
                            break;
                        };
                        let result = write_v1_file(layout, gzip.as_ref(), file, staging);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        results.lock().expect("not poisoned").push((i, result));
                    }
                });
            }
        });
        let mut results = results.into_inner().expect("not poisoned");
        results.sort_by_key(|(i, _)| *i);
        let mut records = Vec::new();
        let mut total = 0;
        for (_, result) in results {
            let (record, bytes) = result?;
            if records.iter().any(|r: &FileRecord| r.name == record.name) {
                return Err(EngineError::Refused(format!(
                    "two files in the image are both named {:?}",
                    record.name
                )));
            }
            total += bytes;
            records.push(record);
        }
        let names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
        for record in &records {
            // v1 keeps backing references as written: they must name a file of the image.
            check_header(&staging.join(&record.name), None, |reference| {
                sarde_format::check_file_name(reference).is_ok()
                    && names.iter().any(|n| n == reference)
            })?;
        }
        Ok((records, total))
    }

    /// Whether an imported VM's files still hold what the record says.
    fn intact(&self, dir: &Path, marker: &Marker) -> Result<bool> {
        for file in &marker.files {
            let path = dir.join(&file.name);
            match fs::metadata(&path) {
                Ok(meta) if meta.len() == file.size => {}
                _ => return Ok(false),
            }
            if file.stamp.is_some() && FileStamp::of(&path).ok() == file.stamp {
                continue;
            }
            let spans: Vec<sarde_disk::PieceSpan> = file
                .regions
                .iter()
                .map(|r| sarde_disk::PieceSpan {
                    offset: r.offset,
                    length: r.size,
                    digest: r.digest.clone(),
                })
                .collect();
            if !sarde_disk::verify_file(&path, &spans, self.effective_threads())? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes a VM that sarde imported (for --replace): stop, undefine, delete files.
    fn remove_vm(&self, hypervisor: &dyn Hypervisor, name: &str, dir: &Path) -> Result<()> {
        use sarde_api::hypervisor::DomainState;
        if matches!(
            hypervisor.state(name)?,
            DomainState::Running | DomainState::Paused
        ) {
            hypervisor.destroy(name)?;
        }
        if hypervisor.exists(name)? {
            hypervisor.undefine(name)?;
        }
        if Marker::read(dir).is_some() {
            fs::remove_dir_all(dir)
                .map_err(EngineError::io(dir, "removing the replaced VM's files"))?;
        } else if dir.exists() {
            tracing::warn!(
                "{} was not made by sarde; leaving it in place",
                dir.display()
            );
        }
        Ok(())
    }
}

/// How far into a file `qemu-img rebase -u` may write: the header cluster (qcow2
/// clusters are at most 2 MiB).
const REBASE_REACH: u64 = 2 << 20;

/// The absolute paths of an import's own files, as the defined XML names them.
fn files_and_nvram(records: &[FileRecord], dir: &Path, nvram: Option<&Path>) -> Vec<String> {
    let mut own: Vec<String> = records
        .iter()
        .map(|r| dir.join(&r.name).to_string_lossy().into_owned())
        .collect();
    if let Some(n) = nvram {
        own.push(n.to_string_lossy().into_owned());
    }
    own
}

/// Refuses a file whose header is not what the image announced: another format
/// (a "raw" file that is really qcow2 could name any host file as backing), an
/// external data file, or a backing reference `backing_ok` does not accept.
fn check_header(
    path: &Path,
    format: Option<&str>,
    backing_ok: impl Fn(&str) -> bool,
) -> Result<()> {
    let header = sarde_disk::inspect(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let refuse = |why: String| {
        Err(EngineError::Refused(format!(
            "{name} in the image is unsafe: {why}"
        )))
    };
    if let Some(expected) = format {
        if header.format != expected {
            return refuse(format!(
                "it is announced as {expected} but its content is {}",
                header.format
            ));
        }
    } else if !matches!(header.format.as_str(), "qcow2" | "raw") {
        return refuse(format!(
            "its format {} is neither qcow2 nor raw",
            header.format
        ));
    }
    if let Some(data_file) = &header.data_file {
        return refuse(format!(
            "its header names the external data file {data_file:?}"
        ));
    }
    if let Some(reference) = &header.backing_reference {
        if !backing_ok(reference) {
            return refuse(format!(
                "its header names the backing file {reference:?}, which is not a file of the image"
            ));
        }
    }
    Ok(())
}

/// sha256 of `size` bytes of `path` at `offset`.
fn hash_range(path: &Path, offset: u64, size: u64) -> Result<Digest> {
    let file = File::open(path).map_err(EngineError::io(path, "opening to hash"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < size {
        let want = (size - done).min(buf.len() as u64) as usize;
        let n = file
            .read_at(&mut buf[..want], offset + done)
            .map_err(EngineError::io(path, "reading to hash"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(Digest::from_sha256(hasher.finalize().into()))
}

/// A VM name becomes a directory name: plain, visible, no separators.
fn check_vm_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 200 {
        Some("it is longer than 200 bytes")
    } else if name.contains('/') || name.contains('\\') {
        Some("it contains a path separator")
    } else if name.starts_with('.') {
        Some("it starts with a dot")
    } else if name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineError::Refused(format!(
            "{name:?} cannot name a VM (it names its directory too): {reason}"
        ))),
        None => Ok(()),
    }
}

/// Names the image a staging directory is being filled from, so a rerun can resume.
const STAGING_STAMP: &str = ".sarde-staging";

/// The largest file a v1 image may inflate to: v1 records no sizes, so this is the
/// only bound on a decompression bomb (the file's digest is still checked).
const V1_MAX_FILE: u64 = 16 << 40;

fn write_v1_file(
    layout: &Blobs<'_>,
    gzip: &dyn sarde_api::Codec,
    file: &v1::V1File,
    staging: &Path,
) -> Result<(FileRecord, u64)> {
    // The file name is in the first piece's gzip header.
    let first = &file.pieces[0];
    let mut head = vec![0u8; first.size.min(64 * 1024) as usize];
    layout
        .open_blob(first)?
        .read_exact(&mut head)
        .map_err(EngineError::io(&layout.blob_path(&first.digest), "reading"))?;
    let header = gzip_header::parse(&head)
        .map_err(|e| EngineError::Refused(format!("v1 layer {}: {e}", first.digest)))?;
    let name = header.file_name.ok_or_else(|| {
        EngineError::Refused(format!(
            "v1 layer {}: the gzip header names no file (FNAME), so the file cannot be named",
            first.digest
        ))
    })?;
    sarde_format::check_file_name(&name)?;
    let path = staging.join(&name);
    let mut readers: Vec<Box<dyn Read + Send>> = Vec::new();
    for piece in &file.pieces {
        let raw = layout.open_blob(piece)?;
        readers.push(Box::new(VerifyingReader::new(
            BufReader::with_capacity(1 << 20, raw),
            piece.digest.clone(),
            piece.size,
            format!("{name} (v1)"),
        )));
    }
    let chained = readers
        .into_iter()
        .reduce(|a, b| Box::new(a.chain(b)))
        .expect("a file has a piece");
    let mut decoder = gzip.decoder(chained)?.take(V1_MAX_FILE + 1);
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(EngineError::io(&path, "creating"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut decoder, &mut buf).map_err(|e| {
            EngineError::Refused(format!("{name}: cannot decompress the v1 layers: {e}"))
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        // Zero blocks stay holes.
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], pos)
                .map_err(EngineError::io(&path, "writing"))?;
        }
        pos += n as u64;
        if pos > V1_MAX_FILE {
            return Err(EngineError::Refused(format!(
                "{name}: inflates beyond {V1_MAX_FILE} bytes"
            )));
        }
    }
    out.set_len(pos).map_err(EngineError::io(&path, "sizing"))?;
    out.sync_all().map_err(EngineError::io(&path, "syncing"))?;
    let digest = Digest::from_sha256(hasher.finalize().into());
    if let Some(expected) = &file.diff_id {
        if *expected != digest {
            return Err(EngineError::Refused(format!(
                "{name}: decompressed content hashes to {digest}, the image config says {expected}"
            )));
        }
    }
    Ok((
        FileRecord {
            name,
            size: pos,
            // v1: the whole file hashed against its diff_id.
            regions: vec![Region {
                offset: 0,
                size: pos,
                digest,
                verified: true,
            }],
            stamp: None,
        },
        pos,
    ))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(EngineError::io(dir, "syncing the directory"))
}

fn uuid_of(hypervisor: &dyn Hypervisor, name: &str) -> Result<String> {
    Ok(hypervisor
        .list_domains()?
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.uuid)
        .unwrap_or_default())
}
