//! # sarde-fuzz-targets
//!
//! One function per fuzz target: each feeds arbitrary bytes to the parser sarde
//! runs on untrusted input (or on a file a user wrote), through the same function
//! the product calls. Errors are expected; a panic, an abort, unbounded memory or
//! a hang is a bug in the product. `fuzz/` runs these under `cargo fuzz`
//! (`scripts/fuzz.sh`); `tests/replay.rs` feeds every committed corpus file and
//! every saved crash (`fuzz/regressions/`) to them on stable, so a fixed crash
//! stays fixed.
//!
//! Inputs made of several parts (a manifest and its config, a header and a body)
//! cut them at NUL bytes ([`parts`]), so seeds stay readable.
//!
//! The `trust/` crate's signature payloads, signature manifests and
//! `policy.json` are targets too (module `trust`).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use sarde_api::codec::decode_exact;
use sarde_api::oci::{Descriptor, ImageIndex, ImageManifest, media_types};
use sarde_api::transport::{Transport, split_scheme};
use sarde_api::{Codec, ImageReference, Registry};

/// The v1 importer's gzip header reader. It is private to `sarde-engine`, so it is
/// compiled here from the same file: the code fuzzed is the code that runs.
#[path = "../../engine/src/gzip_header.rs"]
mod gzip_header;
mod trust;

pub use trust::{policy_json, signature_manifest, signature_payload};

/// A fuzz target: bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target by name: `fuzz/fuzz_targets/<name>.rs` calls the function of the
/// same name, and the replay test runs each one's corpus.
pub const TARGETS: &[(&str, Target)] = &[
    ("reference", reference),
    ("manifest", manifest),
    ("index", index),
    ("image_config", image_config),
    ("domain_xml", domain_xml),
    ("sarde_config_ini", sarde_config_ini),
    ("sarde_config_toml", sarde_config_toml),
    ("executor_config", executor_config),
    ("libvirt_conf", libvirt_conf),
    ("registries_conf", registries_conf),
    ("oci_archive", oci_archive),
    ("v1_gzip", v1_gzip),
    ("codec_zstd", codec_zstd),
    ("codec_xz", codec_xz),
    ("codec_gzip", codec_gzip),
    ("codec_raw", codec_raw),
    ("codec_lz4", codec_lz4),
    ("qcow2_probe", qcow2_probe),
    ("registry_error_body", registry_error_body),
    ("registry_token", registry_token),
    ("registry_www_authenticate", registry_www_authenticate),
    ("registry_link", registry_link),
    ("signature_payload", signature_payload),
    ("signature_manifest", signature_manifest),
    ("policy_json", policy_json),
];

/// `data` cut at its first `N - 1` NUL bytes; missing parts are empty.
pub fn parts<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&data[..0]; N];
    let mut rest = data;
    for slot in out.iter_mut().take(N - 1) {
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                *slot = &rest[..i];
                rest = &rest[i + 1..];
            }
            None => {
                *slot = rest;
                rest = &rest[rest.len()..];
            }
        }
    }
    out[N - 1] = rest;
    out
}

/// Text as the product reads it from a file or an answer: UTF-8 or refused.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A file holding `data`, named `name`, in a fresh directory (gone when dropped).
struct TempFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl TempFile {
    fn new(name: &str, data: &[u8]) -> TempFile {
        let dir = tempfile::Builder::new()
            .prefix("sarde-fuzz")
            .tempdir()
            .expect("a temporary directory");
        let path = dir.path().join(name);
        std::fs::write(&path, data).expect("writing a temporary file");
        TempFile { dir, path }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `future` on a runtime for the async transports, one per thread.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
    }
    RUNTIME.with(|rt| rt.block_on(future))
}

/// The factories compiled into sarde, as the binaries register them.
fn builtins() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = Registry::new();
        sarde_cli::builtin::register_builtins(&mut registry).expect("built-ins register");
        registry
    })
}

/// Image references (`ImageReference::from_str`, what every command and the
/// executor run on an IMAGE argument or a job's image) and `scheme:rest`
/// references of each transport (`TransportFactory::parse_reference`, as
/// `Engine::parse_remote` dispatches them).
pub fn reference(data: &[u8]) {
    let Some(input) = text(data) else { return };
    if let Ok(image) = ImageReference::from_str(input) {
        // What sarde prints and stores must read back as the same reference.
        let shown = image.to_string();
        let again = ImageReference::from_str(&shown)
            .unwrap_or_else(|e| panic!("{input:?} shows as {shown:?}, which does not parse: {e}"));
        assert_eq!(again, image, "{input:?} shows as {shown:?}");
        let familiar = image.familiar();
        let again = ImageReference::from_str(&familiar).unwrap_or_else(|e| {
            panic!("{input:?} is familiarly {familiar:?}, which does not parse: {e}")
        });
        assert_eq!(again, image, "{input:?} is familiarly {familiar:?}");
        let _ = (
            image.registry_location(),
            image.reference_for_registry(),
            image.name(),
            image.tag_or_default(),
            image.cache_path_components(),
            image.qualified_cache_path_components(),
            image.without_digest(),
            image.with_tag("fuzz"),
            sarde_api::transport::registry_scopes(&image),
        );
    }
    let registry = builtins();
    let known = |scheme: &str| registry.transport(scheme).is_ok();
    let (scheme, rest) = split_scheme(input, known).unwrap_or(("docker", input));
    if let Ok(factory) = registry.transport(scheme) {
        let _ = factory.parse_reference(rest);
    }
}

/// An image manifest and its config (cut at a NUL), as the importer reads them:
/// the manifest's JSON, the config checked and parsed, the format detected and
/// the layers grouped into files (`sarde_format::native::parse`, `v1::parse`).
pub fn manifest(data: &[u8]) {
    let [manifest_bytes, config_bytes] = parts(data);
    let Ok(manifest) = serde_json::from_slice::<ImageManifest>(manifest_bytes) else {
        return;
    };
    // The same manifest always serialises the same way, and reads back.
    let bytes = manifest.to_bytes();
    let again: ImageManifest = serde_json::from_slice(&bytes).expect("written JSON reads back");
    assert_eq!(again, manifest);
    assert_eq!(again.to_bytes(), bytes);
    for layer in &manifest.layers {
        let _ = media_types::split(&layer.media_type);
        let _ = sarde_format::native::piece_kind(&layer.media_type);
    }
    let _ = sarde_format::native::parse(&manifest);
    match sarde_format::parse_config(&manifest, config_bytes) {
        Ok(config) => match sarde_format::Format::detect(&manifest) {
            sarde_format::Format::Native => drop(sarde_format::native::parse(&manifest)),
            sarde_format::Format::V1 => drop(sarde_format::v1::parse(&manifest, &config)),
        },
        Err(_) => drop(serde_json::from_slice::<ImageIndex>(manifest_bytes)),
    }
}

/// An OCI layout's `index.json`, as the cache and the `oci:` transport read it
/// (`Layout::index`, `tags`, `resolve` by nothing, tag and digest).
pub fn index(data: &[u8]) {
    let dir = TempFile::new("index.json", data);
    // With its marker present, Layout::create writes nothing: its synced
    // writes made this target 20 ms an input.
    std::fs::write(
        dir.dir().join(sarde_transport_oci_dir::OCI_LAYOUT_FILE),
        sarde_transport_oci_dir::OCI_LAYOUT_MARKER,
    )
    .expect("writing a temporary file");
    let Ok(layout) = sarde_transport_oci_dir::Layout::create(dir.dir()) else {
        return;
    };
    let Ok(index) = layout.index() else { return };
    let _ = layout.resolve("");
    if let Ok(tags) = layout.tags() {
        for (tag, _) in tags.iter().take(16) {
            let _ = layout.resolve(tag);
        }
    }
    for entry in index.manifests.iter().take(16) {
        let _ = layout.resolve(&entry.digest.to_string());
    }
    let _ = layout.resolve("latest");
}

/// An image config blob, as `sarde_format::parse_config` reads it for a
/// native and for a v1 manifest.
pub fn image_config(data: &[u8]) {
    let config = Descriptor::of(media_types::IMAGE_CONFIG, data);
    let xml = Descriptor::of(media_types::DOMAIN_XML, b"<domain/>");
    let native = ImageManifest::new(config.clone(), vec![xml.clone()]);
    let Ok(parsed) = sarde_format::parse_config(&native, data) else {
        return;
    };
    let _ = serde_json::to_vec(&parsed);
    let disk = Descriptor::of(media_types::V1_DISK_GZIP, b"");
    let v1 = ImageManifest::new(config, vec![xml, disk]);
    let _ = sarde_format::v1::parse(&v1, &parsed);
}

/// Domain XML: what import refuses (`check_untrusted`, `check_host_paths`), how
/// import and clone rewrite it (`prepare_import`, `prepare_clone`), what export
/// strips (`prepare_export`), and the readers the lifecycle uses.
pub fn domain_xml(data: &[u8]) {
    let Some(xml) = text(data) else { return };
    let _ = sarde_domain::domain_name(xml);
    let _ = sarde_domain::backing_store_files(xml);
    let _ = sarde_domain::nvram_file(xml);
    let _ = sarde_domain::interface_macs(xml);
    if let Ok(exported) = sarde_domain::prepare_export(xml) {
        let names: Vec<&str> = exported
            .disks
            .iter()
            .map(|d| d.image_name.as_str())
            .chain(exported.nvram.iter().map(|n| n.image_name.as_str()))
            .collect();
        let _ = sarde_domain::check_untrusted(&exported.xml, &names);
    }
    let disks = sarde_domain::file_disk_sources(xml).unwrap_or_default();
    // An image's XML names its files; a hostile image names whatever it likes.
    let files: Vec<String> = disks
        .iter()
        .map(|d| d.source.to_string_lossy().into_owned())
        .collect();
    let allowed: Vec<&str> = files.iter().map(String::as_str).collect();
    let _ = sarde_domain::check_untrusted(xml, &allowed);
    let vm = Path::new("/var/lib/sardinecake/VMs/fuzz-vm");
    for nvram in [None, Some(vm.join("nvram.fd"))] {
        let spec = sarde_domain::ImportSpec {
            name: "fuzz-vm".into(),
            files: files.iter().map(|f| (f.clone(), vm.join(f))).collect(),
            nvram,
            keep_uuid: false,
        };
        if let Ok(imported) = sarde_domain::prepare_import(xml, &spec) {
            // libvirt defines the VM sarde named, from XML sarde itself reads back.
            let name = sarde_domain::domain_name(&imported)
                .unwrap_or_else(|e| panic!("the imported XML does not read back: {e}"));
            assert_eq!(name, "fuzz-vm", "the imported XML names another VM");
            let own = spec.own_paths();
            let own: Vec<&str> = own.iter().map(String::as_str).collect();
            let _ = sarde_domain::check_host_paths(&imported, &own);
        }
    }
    let clone = sarde_domain::CloneSpec {
        name: "fuzz-clone".into(),
        overlays: disks
            .iter()
            .map(|d| (d.target.clone(), vm.join(format!("{}.overlay", d.target))))
            .collect(),
        nvram: Some(vm.join("clone-nvram.fd")),
        mac: Some("52:54:00:12:34:56".into()),
    };
    if let Ok(cloned) = sarde_domain::prepare_clone(xml, &clone) {
        let name = sarde_domain::domain_name(&cloned)
            .unwrap_or_else(|e| panic!("the clone's XML does not read back: {e}"));
        assert_eq!(name, "fuzz-clone", "the clone's XML names another VM");
    }
}

/// `sarde`'s configuration from one file with `extension`, for every command
/// and for none (`Config::load`: the file's sections, the values checked).
fn sarde_config(data: &[u8], extension: &str) {
    let file = TempFile::new(&format!("sarde.{extension}"), data);
    let env = sarde_cli::config::Environment {
        root: false,
        home: Some(file.dir().to_path_buf()),
        libvirt_uri: sarde_api::default_uri::DefaultUri {
            uri: "qemu:///session".into(),
            origin: String::new(),
        },
        files: vec![file.path().to_path_buf()],
        files_from_env: true,
    };
    let flags = sarde_cli::config::FlagValues::default();
    let commands = sarde_cli::config::command_names();
    // The first byte picks a command, so each gets its share of the inputs.
    let command = data
        .first()
        .and_then(|b| commands.get(usize::from(*b) % (commands.len() + 1)))
        .copied();
    if let Ok(config) = sarde_cli::config::Config::load(&env, command, &flags) {
        let _ = config.report();
    }
}

/// `sarde.ini` (configparser syntax, as the Python tool read it).
pub fn sarde_config_ini(data: &[u8]) {
    sarde_config(data, "ini");
}

/// `sarde.toml`.
pub fn sarde_config_toml(data: &[u8]) {
    sarde_config(data, "toml");
}

/// The executor's INI file and a job's image (cut at a NUL): the files read
/// (`Files::read`), the image's section and settings, the allow-list.
pub fn executor_config(data: &[u8]) {
    let [ini, image] = parts(data);
    let file = TempFile::new("gitlab-sardinecake-executor.ini", ini);
    let Ok(files) = sarde_executor::config::Files::read(&[file.path().to_path_buf()]) else {
        return;
    };
    let registry = builtins();
    let is_scheme = |scheme: &str| registry.transport(scheme).is_ok();
    let image = text(image).unwrap_or("registry.example/fuzz:latest");
    for image in [None, Some(image)] {
        if let Ok(settings) = files.settings(image, &BTreeMap::new(), false, &is_scheme) {
            let _ = settings.allows(image.unwrap_or("fuzz"), &is_scheme);
        }
    }
}

/// libvirt's client configuration (`uri_default`), read for the default of
/// `connect`.
pub fn libvirt_conf(data: &[u8]) {
    if let Some(conf) = text(data) {
        let _ = sarde_api::default_uri::uri_default(conf);
    }
}

/// containers-registries.conf(5): a main file, a drop-in and an image reference
/// (cut at NULs), loaded (`RegistriesConf::load`) and applied (`resolve`,
/// `applies_to`) to the reference, to well-known names and to every table's
/// own prefix.
pub fn registries_conf(data: &[u8]) {
    use sarde_transport_registry::registries_conf::{ConfFiles, RegistriesConf};
    let [main, drop_in, name] = parts(data);
    let main = TempFile::new("registries.conf", main);
    let drop_in = TempFile::new("50-fuzz.conf", drop_in);
    let files = ConfFiles {
        main: Some(main.path().to_path_buf()),
        drop_ins: vec![drop_in.path().to_path_buf()],
    };
    let Ok(conf) = RegistriesConf::load(&files) else {
        return;
    };
    let mut names: Vec<(String, String)> = vec![
        ("docker.io".into(), "library/busybox".into()),
        ("registry.example:5000".into(), "team/vm".into()),
    ];
    if let Some(image) = text(name).and_then(|n| ImageReference::from_str(n).ok()) {
        names.push((image.registry_location(), image.repository().to_string()));
    }
    for table in conf.tables.iter().take(8) {
        let prefix = table.effective_prefix();
        let (location, repository) = prefix.split_once('/').unwrap_or((prefix, "fuzz"));
        names.push((location.to_string(), format!("{repository}/fuzz")));
    }
    for (location, repository) in &names {
        let _ = conf.applies_to(location);
        let _ = conf.table_for(&format!("{location}/{repository}"));
        for by_digest in [false, true] {
            let _ = conf.resolve(location, repository, by_digest);
        }
    }
}

/// The most of one blob the archive target reads.
const ARCHIVE_BLOB_READ: u64 = 1 << 20;

/// An `oci-archive:` tar file, read as a pull reads it: the tags, the manifest
/// (the only one, by tag, by digest), its config blob and one layer, checked
/// against their descriptors.
pub fn oci_archive(data: &[u8]) {
    use tokio::io::AsyncReadExt;
    let file = TempFile::new("image.tar", data);
    let archive = sarde_transport_oci_archive::OciArchiveTransport::new(file.path());
    block_on(async {
        let tags = archive.list_tags("").await.unwrap_or_default();
        let mut references = vec![String::new()];
        references.extend(tags.into_iter().take(4));
        for reference in references {
            let Ok(raw) = archive.get_manifest("", &reference).await else {
                continue;
            };
            let _ = archive.get_manifest("", &raw.digest.to_string()).await;
            let Ok(manifest) = serde_json::from_slice::<ImageManifest>(&raw.bytes) else {
                continue;
            };
            for blob in std::iter::once(&manifest.config).chain(manifest.layers.first()) {
                if !archive.blob_exists("", blob).await.unwrap_or(false) {
                    continue;
                }
                let Ok(reader) = archive.get_blob("", blob, 0).await else {
                    continue;
                };
                let mut bytes = Vec::new();
                let _ = reader.take(ARCHIVE_BLOB_READ).read_to_end(&mut bytes).await;
            }
        }
    });
}

/// The most a v1 target decompresses.
const V1_MAX_OUTPUT: u64 = 64 << 20;

/// One file of a v1 (Python tool) image: the first two bytes say how long its
/// first piece is, the rest is the gzip stream its pieces make. The importer
/// reads the name from the first piece's gzip header, checks it, and decodes
/// the pieces concatenated.
pub fn v1_gzip(data: &[u8]) {
    let Some((head, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let first = usize::from(u16::from_le_bytes(*head)).min(stream.len());
    let Ok(header) = gzip_header::parse(&stream[..first]) else {
        return;
    };
    let Some(name) = header.file_name else { return };
    if sarde_format::check_file_name(&name).is_err() {
        return;
    }
    let gzip = sarde_codec_gzip::Gzip;
    let Ok(decoder) = gzip.decoder(Box::new(stream)) else {
        return;
    };
    let _ = io::copy(&mut decoder.take(V1_MAX_OUTPUT + 1), &mut io::sink());
}

/// The largest size a codec target announces: bounds the work per input.
const CODEC_MAX_EXPECTED: u64 = 16 << 20;

/// Counts what it is given.
#[derive(Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A piece as the importer decodes it: the first four bytes are the size the
/// manifest announces, the rest is the compressed blob. `decode_exact` must
/// succeed with exactly that many bytes or fail, and never let more than one
/// byte past the announced size out (the size guard against bombs).
fn codec(codec: &dyn Codec, data: &[u8]) {
    let Some((head, stream)) = data.split_first_chunk::<4>() else {
        return;
    };
    let expected = u64::from(u32::from_le_bytes(*head)) % (CODEC_MAX_EXPECTED + 1);
    let mut out = Counter::default();
    let result = decode_exact(codec, Box::new(stream), &mut out, expected);
    match result {
        Ok(()) => assert_eq!(out.0, expected, "{} decoded another size", codec.name()),
        Err(_) => assert!(
            out.0 <= expected + 1,
            "{} let {} bytes out past the announced {expected}",
            codec.name(),
            out.0
        ),
    }
}

/// zstd pieces.
pub fn codec_zstd(data: &[u8]) {
    codec(&sarde_codec_zstd::Zstd, data);
}

/// xz pieces.
pub fn codec_xz(data: &[u8]) {
    codec(&sarde_codec_xz::Xz, data);
}

/// gzip pieces.
pub fn codec_gzip(data: &[u8]) {
    codec(&sarde_codec_gzip::Gzip, data);
}

/// Uncompressed pieces.
pub fn codec_raw(data: &[u8]) {
    codec(&sarde_codec_raw::Raw, data);
}

/// The example plugin's LZ4 pieces.
pub fn codec_lz4(data: &[u8]) {
    codec(&sarde_plugin_example_lz4::Lz4, data);
}

/// A disk file of an image, probed as the importer checks it before qemu or
/// libvirt see it (`sarde_disk::inspect`: `qemu-img info` on the file, its JSON
/// read). Without qemu-img there is nothing to probe.
pub fn qcow2_probe(data: &[u8]) {
    let file = TempFile::new("disk.qcow2", data);
    let _ = sarde_disk::inspect(file.path());
}

/// A registry's failed answer: the first two bytes are the status, then
/// `Retry-After` values and the body (cut at NULs; values on lines).
pub fn registry_error_body(data: &[u8]) {
    let Some((status, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_le_bytes(*status) % 1000;
    let [retry_after, body] = parts(rest);
    let values: Vec<&[u8]> = retry_after.split(|&b| b == b'\n').collect();
    for error in sarde_transport_registry::fuzzing::error_answer(status, &values, body) {
        let _ = error.to_string();
        let _ = error.is_transient();
    }
}

/// A token server's answer body.
pub fn registry_token(data: &[u8]) {
    if let Err(error) = sarde_transport_registry::fuzzing::token_answer(data) {
        let _ = error.to_string();
    }
}

/// `WWW-Authenticate` values (one a line) of a 401.
pub fn registry_www_authenticate(data: &[u8]) {
    let values: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let _ = sarde_transport_registry::fuzzing::www_authenticate(&values);
}

/// `Link` values (one a line) of a tag list page.
pub fn registry_link(data: &[u8]) {
    let values: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let _ = sarde_transport_registry::fuzzing::next_page(&values);
}
