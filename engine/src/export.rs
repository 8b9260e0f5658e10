//! `sarde export`: a libvirt domain and its disks (every file of every backing chain)
//! into the local OCI layout, compressed and hashed in parallel, streaming.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sarde_api::digest::{Digest, DigestWriter};
use sarde_api::hypervisor::DomainState;
use sarde_api::oci::{Descriptor, media_types};
use sarde_api::{Codec, EncodeOptions};
use sarde_disk::{PieceSink, PieceWriter};
use sarde_format::native::{self, FileSpec, ImageMeta, NativeFile, Piece};
use sarde_format::v1::{self, GZIP_MAGIC, V1FileOut};
use sarde_format::{FileRole, Format};
use sarde_transport_oci_dir::{BlobWriter, Layout};

use crate::export_record::{self, ExportRecord};
use crate::marker::FileStamp;
use crate::{Engine, EngineError, ImageLocation, Result, read_full};

/// What to export, as the user asked.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The libvirt domain name (also used when `libvirt_xml` is given, for messages).
    pub vm: String,
    /// Read the domain XML from this file instead of libvirt.
    pub libvirt_xml: Option<PathBuf>,
    /// The access JSON (users, services) to store with the image.
    pub vm_config: Option<PathBuf>,
    pub image: ImageLocation,
    /// Uncompressed piece size (native) or compressed piece size (v1).
    pub chunksize: u64,
    /// The codec; `None`: the format's own (zstd native, gzip v1).
    pub codec: Option<String>,
    pub level: Option<i32>,
    pub format: Format,
    /// Export even though the VM runs (its disks may be inconsistent).
    pub force: bool,
}

/// What an export produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportOutcome {
    /// The config digest, which identifies the image (the Python tool printed it too).
    pub image_id: Digest,
    pub manifest: Digest,
    pub image: String,
    pub files: usize,
    /// Layers in the manifest.
    pub layers: usize,
    /// Bytes read from the VM's files.
    pub bytes_read: u64,
    /// Compressed bytes of all disk layers.
    pub bytes_stored: u64,
    /// Pieces not stored because they are all zero.
    pub zero_pieces: usize,
    /// Files not read at all: unchanged since their last export (same identity
    /// stamp), their pieces taken from it.
    pub files_unchanged: usize,
    /// Pieces whose blob an earlier export made of the same bytes: hashed, not
    /// compressed (files unchanged included).
    pub pieces_reused: usize,
}

/// One file to export.
#[derive(Debug, Clone)]
struct SourceFile {
    path: PathBuf,
    spec: FileSpec,
    /// The backing reference as stored in the file, when it must change for v1.
    backing_reference: Option<String>,
    mtime: i64,
}

impl Engine {
    /// Exports a VM; prints nothing, returns what was made.
    pub fn export(&self, request: &ExportRequest) -> Result<ExportOutcome> {
        // Every argument is checked before anything is written.
        let codec = self.export_codec(request)?;
        let xml = self.source_xml(request)?;
        let exported = sarde_domain::prepare_export(&xml)?;
        let files = collect_files(&exported)?;
        let vm_config = match &request.vm_config {
            Some(path) => Some(read_vm_config(path)?),
            None => None,
        };

        // New blobs and the tag's old image stay while the export runs.
        let _lease = self.lease_image("export", &request.image, true)?;
        let layout = Layout::create(&request.image.layout)?;
        let (xml_digest, xml_size) = layout.write_blob(exported.xml.as_bytes())?;
        let xml_layer = Descriptor::new(media_types::DOMAIN_XML, xml_digest, xml_size);
        let json_layer = match vm_config {
            Some(bytes) => {
                let (digest, size) = layout.write_blob(&bytes)?;
                Some(Descriptor::new(media_types::VM_CONFIG, digest, size))
            }
            None => None,
        };
        let newest = files.iter().map(|f| f.mtime).max().unwrap_or(0);
        let meta = ImageMeta {
            architecture: exported.architecture.clone(),
            os: exported.os.clone(),
            created: sarde_format::rfc3339(newest),
        };
        let mut outcome = ExportOutcome {
            image_id: xml_layer.digest.clone(),
            manifest: xml_layer.digest.clone(),
            image: request.image.name.clone(),
            files: files.len(),
            layers: 0,
            bytes_read: 0,
            bytes_stored: 0,
            zero_pieces: 0,
            files_unchanged: 0,
            pieces_reused: 0,
        };
        let built = match request.format {
            Format::Native => {
                let options = self.piece_options(request);
                let encoding = export_record::encoding_of(codec.as_ref(), &options)?;
                let mut stored = Vec::new();
                for file in &files {
                    tracing::info!(file = %file.path.display(), name = %file.spec.name, "exporting");
                    let native_file = self.export_native_file(
                        &layout,
                        file,
                        codec.as_ref(),
                        (&options, &encoding),
                        request,
                        &mut outcome,
                    )?;
                    stored.push(native_file);
                }
                native::build(&meta, &xml_layer, json_layer.as_ref(), &stored)?
            }
            Format::V1 => {
                let mut stored = Vec::new();
                for file in &files {
                    tracing::info!(file = %file.path.display(), name = %file.spec.name, "exporting (v1)");
                    outcome.bytes_read += file.spec.size;
                    stored.push(self.export_v1_file(
                        &layout,
                        file,
                        codec.as_ref(),
                        request,
                        &mut outcome,
                    )?);
                }
                v1::build(&meta, &xml_layer, json_layer.as_ref(), &stored)
            }
        };
        let (config_digest, _) = layout.write_blob(&built.config)?;
        debug_assert_eq!(config_digest, built.config_descriptor.digest);
        let manifest = layout.put_manifest(&built.manifest_bytes, media_types::IMAGE_MANIFEST)?;
        let tag = request.image.tag().ok_or_else(|| {
            EngineError::Refused(format!(
                "{}: export needs a tag, not a digest, to name the image",
                request.image.name
            ))
        })?;
        layout.set_tag(tag, &manifest)?;
        outcome.image_id = built.config_descriptor.digest;
        outcome.manifest = manifest.digest;
        outcome.layers = built.manifest.layers.len();
        self.record_image_use(&request.image, &outcome.manifest);
        Ok(outcome)
    }

    fn source_xml(&self, request: &ExportRequest) -> Result<String> {
        if let Some(path) = &request.libvirt_xml {
            return std::fs::read_to_string(path)
                .map_err(EngineError::io(path, "reading the domain XML"));
        }
        let hypervisor = self.registry.connect(&self.connect)?;
        let state = hypervisor.state(&request.vm)?;
        if matches!(state, DomainState::Running | DomainState::Paused) && !request.force {
            return Err(EngineError::Refused(format!(
                "VM {:?} is {}: its disks change while it runs, so the image would be inconsistent; shut it down first, or pass --force",
                request.vm,
                if state == DomainState::Running {
                    "running"
                } else {
                    "paused"
                }
            )));
        }
        Ok(hypervisor.domain_xml(&request.vm, true)?)
    }

    /// How native pieces are compressed: parallelism comes from pieces, a stream
    /// per thread, none inside a stream.
    fn piece_options(&self, request: &ExportRequest) -> EncodeOptions {
        EncodeOptions {
            level: request.level,
            threads: 0,
            ..EncodeOptions::default()
        }
    }

    fn export_native_file(
        &self,
        layout: &Layout,
        file: &SourceFile,
        codec: &dyn Codec,
        (options, encoding): (&EncodeOptions, &str),
        request: &ExportRequest,
        outcome: &mut ExportOutcome,
    ) -> Result<NativeFile> {
        let source = std::fs::canonicalize(&file.path).map_err(EngineError::io(
            &file.path,
            "resolving the disk file's path",
        ))?;
        let before = FileStamp::of(&source).map_err(EngineError::io(&source, "reading"))?;
        let ocidir = self.ocidir.root();
        let record = ExportRecord::load(ocidir, &source, encoding, request.chunksize);
        if let Some(record) = record.as_ref().filter(|r| r.unchanged(&before)) {
            if self.reuse_whole_file(layout, record)? {
                tracing::info!(file = %source.display(), "unchanged since its last export: not read");
                outcome.files_unchanged += 1;
                outcome.pieces_reused += record.pieces.len();
                outcome.zero_pieces += record.zero_pieces;
                outcome.bytes_stored += record.pieces.iter().map(|p| p.blob_size).sum::<u64>();
                return Ok(NativeFile {
                    spec: file.spec.clone(),
                    pieces: record.pieces.clone(),
                });
            }
        }
        outcome.bytes_read += file.spec.size;
        let sink = LayoutSink {
            layout,
            previous: record.as_ref().map(|r| (r.by_range(), r.layout.as_path())),
        };
        let infos = sarde_disk::export_file(
            &source,
            request.chunksize,
            self.disk_bound_threads(),
            codec,
            options,
            &sink,
        )?;
        outcome.pieces_reused += infos.iter().filter(|i| i.reused).count();
        let mut zero_pieces = 0usize;
        let suffix = codec.media_type_suffix().map(str::to_string);
        let mut pieces = Vec::new();
        for info in &infos {
            match &info.blob {
                Some((blob, blob_size)) => {
                    outcome.bytes_stored += blob_size;
                    pieces.push(Piece {
                        offset: info.offset,
                        size: info.length,
                        digest: info.uncompressed_digest.clone(),
                        blob: blob.clone(),
                        blob_size: *blob_size,
                        suffix: suffix.clone(),
                    });
                }
                None => zero_pieces += 1,
            }
        }
        // A file keeps at least one piece so its description travels.
        if pieces.is_empty() {
            let length = request.chunksize.min(file.spec.size).max(1);
            let (blob, blob_size, digest) = store_zero_piece(layout, codec, options, length)?;
            outcome.bytes_stored += blob_size;
            zero_pieces = zero_pieces.saturating_sub(1);
            pieces.push(Piece {
                offset: 0,
                size: length,
                digest,
                blob,
                blob_size,
                suffix,
            });
        }
        outcome.zero_pieces += zero_pieces;
        // Recorded only when the file did not change while it was read.
        if FileStamp::of(&source).is_ok_and(|after| after == before) {
            let record = ExportRecord {
                path: source.clone(),
                stamp: before,
                encoding: encoding.to_string(),
                piece_size: request.chunksize,
                layout: layout.path().to_path_buf(),
                pieces: pieces.clone(),
                zero_pieces,
            };
            if let Err(e) = record.save(ocidir) {
                tracing::warn!(
                    "{}: keeping the export record: {e}; the next export reads the whole file",
                    source.display()
                );
            }
        }
        Ok(NativeFile {
            spec: file.spec.clone(),
            pieces,
        })
    }

    /// Provides every blob of an unchanged file's record in `layout`; false when
    /// one is gone (the file is then exported piece by piece).
    fn reuse_whole_file(&self, layout: &Layout, record: &ExportRecord) -> Result<bool> {
        for piece in &record.pieces {
            if !export_record::provide_blob(layout, &record.layout, piece)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The codec of the request, or the format's: v1 images hold gzip
    /// streams only (what the Python tool reads).
    fn export_codec(&self, request: &ExportRequest) -> Result<std::sync::Arc<dyn Codec>> {
        let name = request.codec.as_deref().unwrap_or(match request.format {
            Format::Native => "zstd",
            Format::V1 => "gzip",
        });
        let codec = self.registry.codec(name)?;
        if request.format == Format::V1 && codec.media_type_suffix() != Some("+gzip") {
            return Err(EngineError::Refused(format!(
                "the v1 format stores gzip streams only: drop --codec {} (v1 uses gzip), or export the native format",
                codec.name()
            )));
        }
        Ok(codec)
    }

    fn export_v1_file(
        &self,
        layout: &Layout,
        file: &SourceFile,
        codec: &dyn Codec,
        request: &ExportRequest,
        outcome: &mut ExportOutcome,
    ) -> Result<V1FileOut> {
        let options = EncodeOptions {
            level: request.level.or(Some(6)),
            threads: self.effective_threads(),
            file_name: Some(file.spec.name.clone()),
            mtime: u32::try_from(file.mtime).ok(),
        };
        let mut split = SplitWriter::new(layout, request.chunksize);
        let mut hasher = DigestWriter::new(io::sink());
        {
            let mut encoder = codec.encoder(Box::new(&mut split), &options)?;
            let mut input =
                File::open(&file.path).map_err(EngineError::io(&file.path, "opening"))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut first = true;
            loop {
                let n = read_full(&mut input, &mut buf)
                    .map_err(EngineError::io(&file.path, "reading"))?;
                if n == 0 {
                    break;
                }
                if first {
                    first = false;
                    if let (Some(name), Some(_)) = (&file.spec.backing, &file.backing_reference) {
                        patch_qcow2_backing(&mut buf[..n], name).map_err(|m| {
                            EngineError::Refused(format!(
                                "{}: cannot point the backing reference at {name:?} for the v1 format: {m}; export with the native format instead",
                                file.path.display()
                            ))
                        })?;
                    }
                }
                hasher
                    .write_all(&buf[..n])
                    .expect("hashing into a sink cannot fail");
                encoder
                    .write_all(&buf[..n])
                    .map_err(EngineError::io(&file.path, "compressing"))?;
            }
            encoder
                .finish()
                .map_err(EngineError::io(&file.path, "compressing"))?;
        }
        let pieces = split.finish()?;
        outcome.bytes_stored += pieces.iter().map(|(_, s)| s).sum::<u64>();
        let (_, diff_id, _) = hasher.finish();
        Ok(V1FileOut {
            name: file.spec.name.clone(),
            pieces,
            diff_id,
        })
    }
}

/// The access JSON must be a JSON object; it is stored as given.
fn read_vm_config(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(EngineError::io(path, "reading the VM config"))?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(_)) => Ok(bytes),
        Ok(_) => Err(EngineError::Refused(format!(
            "{}: the VM config must be a JSON object such as {{\"users\":[{{\"username\":\"vagrant\",\"password\":\"vagrant\"}}]}}",
            path.display()
        ))),
        Err(e) => Err(EngineError::Refused(format!(
            "{}: not valid JSON: {e}",
            path.display()
        ))),
    }
}

/// Every file to export, NVRAM first, then each disk's chain from base to top; names
/// unique within the image; a base shared by two disks is stored once.
fn collect_files(exported: &sarde_domain::ExportedDomain) -> Result<Vec<SourceFile>> {
    let mut files: Vec<SourceFile> = Vec::new();
    let mut names: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    // Names the domain XML already uses are reserved first.
    for disk in &exported.disks {
        used.insert(disk.image_name.clone());
    }
    if let Some(nvram) = &exported.nvram {
        used.insert(nvram.image_name.clone());
        let path = nvram.source.clone();
        let meta =
            std::fs::metadata(&path).map_err(EngineError::io(&path, "reading the NVRAM file"))?;
        files.push(SourceFile {
            spec: FileSpec {
                name: nvram.image_name.clone(),
                role: FileRole::Nvram,
                format: "raw".into(),
                size: meta.len(),
                backing: None,
            },
            backing_reference: None,
            mtime: mtime_of(&meta),
            path,
        });
    }
    // Tops first: a file that one disk uses directly and another as its backing
    // file keeps the name the domain XML gives it.
    let mut chains = Vec::new();
    for disk in &exported.disks {
        let chain = sarde_disk::backing_chain(&disk.source)?;
        if let Some(top) = chain.last() {
            names
                .entry(top.path.clone())
                .or_insert_with(|| disk.image_name.clone());
        }
        chains.push(chain);
    }
    let mut stored: BTreeSet<PathBuf> = BTreeSet::new();
    for chain in &chains {
        for link in chain {
            if !stored.insert(link.path.clone()) {
                continue;
            }
            let name = if let Some(name) = names.get(&link.path) {
                name.clone()
            } else {
                let base = link
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "disk".into());
                unique_name(&base, &mut used)
            };
            sarde_format::check_file_name(&name)?;
            names.insert(link.path.clone(), name.clone());
            let meta = std::fs::metadata(&link.path)
                .map_err(EngineError::io(&link.path, "reading the disk file"))?;
            let backing = link.backing.as_ref().map(|b| names[b].clone());
            let reference_differs = match (&backing, &link.backing_reference) {
                (Some(name), Some(reference)) => {
                    reference != name && reference.strip_prefix("./") != Some(name.as_str())
                }
                _ => false,
            };
            files.push(SourceFile {
                path: link.path.clone(),
                spec: FileSpec {
                    name,
                    role: FileRole::Disk,
                    format: link.format.clone(),
                    size: link.file_size,
                    backing,
                },
                backing_reference: if reference_differs {
                    link.backing_reference.clone()
                } else {
                    None
                },
                mtime: mtime_of(&meta),
            });
        }
    }
    Ok(files)
}

fn mtime_of(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
}

/// `disk.qcow2` → `disk-1.qcow2`, `disk-2.qcow2`… until unused.
fn unique_name(base: &str, used: &mut BTreeSet<String>) -> String {
    if used.insert(base.to_string()) {
        return base.to_string();
    }
    let (stem, ext) = match base.rfind('.') {
        Some(i) if i > 0 => (&base[..i], &base[i..]),
        _ => (base, ""),
    };
    (1..)
        .map(|n| format!("{stem}-{n}{ext}"))
        .find(|candidate| used.insert(candidate.clone()))
        .expect("some suffix is free")
}

/// Stores one compressed all-zero piece of `length` bytes.
fn store_zero_piece(
    layout: &Layout,
    codec: &dyn Codec,
    options: &EncodeOptions,
    length: u64,
) -> Result<(Digest, u64, Digest)> {
    let mut writer = layout.blob_writer()?;
    let mut hasher = DigestWriter::new(io::sink());
    {
        let mut encoder = codec.encoder(Box::new(&mut writer), options)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = length;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            encoder
                .write_all(&zeros[..n])
                .map_err(EngineError::io(layout.path(), "compressing"))?;
            hasher.write_all(&zeros[..n]).expect("sink");
            left -= n as u64;
        }
        encoder
            .finish()
            .map_err(EngineError::io(layout.path(), "compressing"))?;
    }
    let (blob, size) = writer.commit(None)?;
    Ok((blob, size, hasher.finish().1))
}

/// Piece blobs go straight into the layout; pieces the last export of the file
/// stored are reused when their content is unchanged.
struct LayoutSink<'a> {
    layout: &'a Layout,
    previous: Option<Previous<'a>>,
}

/// The last export's pieces by (offset, size), and the layout it wrote.
type Previous<'a> = (HashMap<(u64, u64), &'a Piece>, &'a Path);

struct LayoutPiece(BlobWriter);

impl Write for LayoutPiece {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl PieceWriter for LayoutPiece {
    fn commit(self: Box<Self>) -> io::Result<(Digest, u64)> {
        self.0.commit(None).map_err(io::Error::other)
    }
    fn discard(self: Box<Self>) {
        // Dropping the writer removes its temporary file.
    }
}

impl PieceSink for LayoutSink<'_> {
    fn begin(&self, _index: usize) -> io::Result<Box<dyn PieceWriter + '_>> {
        // Past the page cache: nothing reads an export's pieces back soon.
        let writer = self.layout.blob_writer_direct().map_err(io::Error::other)?;
        Ok(Box::new(LayoutPiece(writer)))
    }

    fn has_previous(&self, offset: u64, length: u64) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|(pieces, _)| pieces.contains_key(&(offset, length)))
    }

    fn reuse(
        &self,
        offset: u64,
        length: u64,
        digest: &Digest,
    ) -> io::Result<Option<(Digest, u64)>> {
        let Some((pieces, recorded_in)) = &self.previous else {
            return Ok(None);
        };
        let Some(piece) = pieces
            .get(&(offset, length))
            .filter(|p| p.digest == *digest)
        else {
            return Ok(None);
        };
        let provided = export_record::provide_blob(self.layout, recorded_in, piece)
            .map_err(io::Error::other)?;
        Ok(provided.then(|| (piece.blob.clone(), piece.blob_size)))
    }
}

/// Cuts one compressed stream into blobs of at most `chunk` bytes (the v1 layout).
/// A continuation piece never starts with the gzip magic: where it would, the
/// previous piece ends one byte early, so the Python importer, which looks for the
/// magic, never sees a file boundary that is not one.
struct SplitWriter<'a> {
    layout: &'a Layout,
    chunk: u64,
    current: Option<BlobWriter>,
    current_len: u64,
    /// Bytes not yet placed: at most 2, kept to look ahead at a cut.
    pending: Vec<u8>,
    done: Vec<(Digest, u64)>,
}

impl<'a> SplitWriter<'a> {
    fn new(layout: &'a Layout, chunk: u64) -> Self {
        SplitWriter {
            layout,
            chunk,
            current: None,
            current_len: 0,
            pending: Vec::new(),
            done: Vec::new(),
        }
    }

    fn cut(&mut self) -> io::Result<()> {
        if let Some(writer) = self.current.take() {
            self.done
                .push(writer.commit(None).map_err(io::Error::other)?);
        }
        self.current_len = 0;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.current.is_none() {
            self.current = Some(self.layout.blob_writer().map_err(io::Error::other)?);
        }
        self.current.as_mut().expect("just set").write_all(bytes)?;
        self.current_len += bytes.len() as u64;
        Ok(())
    }

    /// Places pending bytes; keeps back what a cut decision still needs.
    fn drain(&mut self, finishing: bool) -> io::Result<()> {
        let data = std::mem::take(&mut self.pending);
        let mut pos = 0;
        while pos < data.len() {
            let room = self.chunk - self.current_len;
            if room == 0 {
                self.cut()?;
                continue;
            }
            if room == 1 {
                // The cut comes after the next byte; the piece after it starts with
                // the two bytes that follow.
                if data.len() - pos < 3 && !finishing {
                    break;
                }
                if data.len() - pos >= 3 && data[pos + 1..pos + 3] == GZIP_MAGIC {
                    self.cut()?;
                    continue;
                }
                self.put(&data[pos..pos + 1])?;
                pos += 1;
                continue;
            }
            let n = ((room - 1) as usize).min(data.len() - pos);
            self.put(&data[pos..pos + n])?;
            pos += n;
        }
        self.pending = data[pos..].to_vec();
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<(Digest, u64)>> {
        let path = self.layout.path().to_path_buf();
        self.drain(true)
            .map_err(EngineError::io(&path, "writing pieces"))?;
        self.cut()
            .map_err(EngineError::io(&path, "writing pieces"))?;
        Ok(std::mem::take(&mut self.done))
    }
}

impl Write for SplitWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.drain(false)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Rewrites the backing-file name in a qcow2 header (the first bytes of the file) in
/// place, as `qemu-img rebase -u` would, without touching the source file.
fn patch_qcow2_backing(header: &mut [u8], new_name: &str) -> std::result::Result<(), String> {
    if header.len() < 72 || &header[..4] != b"QFI\xfb" {
        return Err("not a qcow2 file".into());
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let offset = be64(&header[8..16]) as usize;
    let old_len = be32(&header[16..20]) as usize;
    let cluster_bits = be32(&header[20..24]);
    if offset == 0 {
        return Err("the file has no backing reference".into());
    }
    let cluster = 1usize.checked_shl(cluster_bits).ok_or("bad cluster size")?;
    let new = new_name.as_bytes();
    let end = offset + new.len().max(old_len);
    if new.len() > 1023 || offset + new.len() > cluster || end > header.len() {
        return Err("the new name does not fit in the header cluster".into());
    }
    header[offset..offset + old_len].fill(0);
    header[offset..offset + new.len()].copy_from_slice(new);
    header[16..20].copy_from_slice(&(new.len() as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_get_numbered_suffixes() {
        let mut used = BTreeSet::new();
        assert_eq!(unique_name("disk.qcow2", &mut used), "disk.qcow2");
        assert_eq!(unique_name("disk.qcow2", &mut used), "disk-1.qcow2");
        assert_eq!(unique_name("disk.qcow2", &mut used), "disk-2.qcow2");
        assert_eq!(unique_name("base", &mut used), "base");
        assert_eq!(unique_name("base", &mut used), "base-1");
    }

    #[test]
    fn split_writer_never_starts_a_continuation_with_gzip_magic() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path().join("l")).unwrap();
        // Place the magic exactly where a cut at 1 MiB would put it.
        let chunk = 1u64 << 20;
        let mut data = vec![7u8; (3 * chunk) as usize];
        data[chunk as usize] = 0x1f;
        data[chunk as usize + 1] = 0x8b;
        let mut split = SplitWriter::new(&layout, chunk);
        for part in data.chunks(4093) {
            split.write_all(part).unwrap();
        }
        let pieces = split.finish().unwrap();
        let mut joined = Vec::new();
        for (i, (digest, size)) in pieces.iter().enumerate() {
            let blob = std::fs::read(layout.blob_path(digest)).unwrap();
            assert_eq!(blob.len() as u64, *size);
            assert!(*size <= chunk);
            if i > 0 {
                assert!(
                    !blob.starts_with(&GZIP_MAGIC),
                    "piece {i} starts with the magic"
                );
            }
            joined.extend_from_slice(&blob);
        }
        assert_eq!(joined, data);
        assert_eq!(pieces[0].1, chunk - 1);
    }

    #[test]
    fn qcow2_backing_name_is_patched_in_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("qemu-img")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "qemu-img {args:?}");
        };
        run(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ]);
        let mut bytes = std::fs::read(&top).unwrap();
        patch_qcow2_backing(&mut bytes, "renamed.qcow2").unwrap();
        std::fs::write(&top, &bytes).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json", top.to_str().unwrap()])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["backing-filename"], "renamed.qcow2");
        assert!(patch_qcow2_backing(&mut [0u8; 100], "x").is_err());
    }
}
