//! qcow2 backing chains, found and rewritten by `qemu-img`: it is the authority on
//! how qemu resolves a backing reference, so we never parse qcow2 headers ourselves.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::DiskError;

/// One file of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    /// Absolute and canonical (symbolic links resolved).
    pub path: PathBuf,
    /// The image format: `qcow2`, `raw`…
    pub format: String,
    /// Size of the disk the guest sees.
    pub virtual_size: u64,
    /// Length of the file on disk: what an export reads.
    pub file_size: u64,
    /// The backing file, absolute and canonical; the next file towards the base.
    pub backing: Option<PathBuf>,
    /// The reference as stored in the image header: `base.qcow2`, `./base.qcow2`, or
    /// an absolute path. qemu resolves relative ones against the directory of the file
    /// that holds them.
    pub backing_reference: Option<String>,
}

/// What `qemu-img info --output=json` says about one image (unknown keys ignored).
#[derive(Debug, Deserialize)]
struct ImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<serde_json::Value>,
}

/// Longest stderr kept in an error: qemu-img can print a path that grew in a loop.
const MAX_STDERR: usize = 2000;

/// The files of the chain that ends with `top`, from the bottom (the base) to `top`.
///
/// Runs `qemu-img info --output=json --backing-chain -U`: `-U` (force-share) lets it
/// read images a running VM holds locked, at the price of possibly seeing metadata in
/// the middle of an update, so export a stopped VM or a snapshot. `top` is given to
/// qemu-img as an absolute path without resolving symbolic links, so relative backing
/// references resolve exactly as they do for the VM that opens `top` by that path.
///
/// Loops and missing backing files are diagnosed by walking the chain one file at a
/// time, so the error names the file whose reference is wrong.
pub fn backing_chain(top: &Path) -> Result<Vec<ChainFile>, DiskError> {
    let top = std::path::absolute(top).map_err(|source| DiskError::Io {
        file: top.to_path_buf(),
        action: "making the path absolute",
        source,
    })?;
    let infos: Vec<ImageInfo> = match qemu_img_info(&top, true) {
        Ok(infos) => infos,
        Err(e) => {
            // Find out which file is at fault; if walking finds nothing, report qemu-img.
            return Err(diagnose(&top).unwrap_or(e));
        }
    };
    let command = info_command(true);
    let bad_output = |message: String| DiskError::QemuImgOutput {
        file: top.clone(),
        command: command.clone(),
        message,
    };
    if infos.is_empty() {
        return Err(bad_output("no image listed".into()));
    }
    let mut chain: Vec<ChainFile> = Vec::with_capacity(infos.len());
    let mut seen = HashSet::new();
    let mut opened_as = top.clone();
    for (i, info) in infos.iter().enumerate() {
        let path = canonical(&opened_as)?;
        check_supported(&path, info)?;
        if !seen.insert(path.clone()) {
            let holder = chain.last().map_or(path.clone(), |c| c.path.clone());
            return Err(DiskError::BackingLoop {
                file: holder,
                backing: path,
            });
        }
        let file_size = std::fs::metadata(&path)
            .map_err(|source| DiskError::Io {
                file: path.clone(),
                action: "reading metadata",
                source,
            })?
            .len();
        let backing = match (&info.backing_filename, &info.full_backing_filename) {
            (None, _) => None,
            (Some(reference), full) => {
                let resolved = resolve(&opened_as, reference, full.as_deref());
                if i + 1 == infos.len() {
                    return Err(bad_output(format!(
                        "{} has backing file {reference:?} but the chain stops there",
                        path.display()
                    )));
                }
                opened_as = resolved;
                Some(
                    opened_as
                        .canonicalize()
                        .map_err(|source| DiskError::BackingMissing {
                            file: path.clone(),
                            reference: reference.clone(),
                            resolved: opened_as.clone(),
                            source,
                        })?,
                )
            }
        };
        if backing.is_none() && i + 1 < infos.len() {
            return Err(bad_output(format!(
                "{} has no backing file but the chain goes on",
                path.display()
            )));
        }
        chain.push(ChainFile {
            path,
            format: info.format.clone(),
            virtual_size: info.virtual_size,
            file_size,
            backing,
            backing_reference: info.backing_filename.clone(),
        });
    }
    // qemu-img lists the top first; callers want the base first.
    chain.reverse();
    Ok(chain)
}

/// Points `file` (a qcow2 image) at `new_backing` (stored as given: relative
/// references resolve against `file`'s directory), or at nothing with `None`.
///
/// Metadata only (`qemu-img rebase -u`): the guest content must already be identical,
/// as when a chain moves to another directory. `backing_format` is required with a
/// backing file, because qemu refuses to guess (a guessed format is a security hole).
/// The new backing file need not exist yet.
pub fn rebase_in_place(
    file: &Path,
    new_backing: Option<&str>,
    backing_format: Option<&str>,
) -> Result<(), DiskError> {
    let mut args: Vec<&OsStr> = ["rebase", "-u", "-f", "qcow2"]
        .iter()
        .map(OsStr::new)
        .collect();
    match (new_backing, backing_format) {
        (Some(backing), Some(format)) => {
            args.extend([OsStr::new("-F"), OsStr::new(format)]);
            args.extend([OsStr::new("-b"), OsStr::new(backing)]);
        }
        (Some(backing), None) => {
            return Err(DiskError::BackingFormatRequired {
                file: file.to_path_buf(),
                backing: backing.to_string(),
            });
        }
        (None, _) => args.extend([OsStr::new("-b"), OsStr::new("")]),
    }
    args.push(file.as_os_str());
    run_qemu_img(file, &args).map(drop)
}

/// Creates a qcow2 overlay `file` on top of `backing` (an absolute path, opened
/// read-only to learn its size; never written). Costs the same whatever the
/// backing file's size: only the overlay's header is written.
pub fn create_overlay(file: &Path, backing: &Path, backing_format: &str) -> Result<(), DiskError> {
    let args: Vec<&OsStr> = vec![
        OsStr::new("create"),
        OsStr::new("-q"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-F"),
        OsStr::new(backing_format),
        OsStr::new("-b"),
        backing.as_os_str(),
        file.as_os_str(),
    ];
    run_qemu_img(file, &args).map(drop)
}

/// What a file's own header says, read without following its backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// The format qemu-img detects by probing (`qcow2`, `raw`…).
    pub format: String,
    /// The backing reference stored in the header, as written.
    pub backing_reference: Option<String>,
    /// An external data file named in the header (qcow2 `data-file`).
    pub data_file: Option<String>,
}

/// Probes one file's header (format detected, not assumed; backing file not opened):
/// what an importer checks before it lets qemu or libvirt near a file from an image.
pub fn inspect(path: &Path) -> Result<ImageHeader, DiskError> {
    let info = qemu_img_info(path, false)?
        .pop()
        .ok_or_else(|| DiskError::QemuImgOutput {
            file: path.to_path_buf(),
            command: info_command(false),
            message: "no output".into(),
        })?;
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|f| f.data.as_ref())
        .and_then(|d| d.get("data-file"))
        .and_then(|d| d.as_str())
        .map(str::to_string);
    Ok(ImageHeader {
        format: info.format,
        backing_reference: info.backing_filename,
        data_file,
    })
}

fn info_command(chain: bool) -> String {
    let chain = if chain { " --backing-chain" } else { "" };
    format!("qemu-img info --output=json{chain} -U")
}

fn qemu_img_info(file: &Path, chain: bool) -> Result<Vec<ImageInfo>, DiskError> {
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
    if chain {
        args.push("--backing-chain".as_ref());
    }
    args.extend(["-U".as_ref(), file.as_os_str()]);
    let stdout = run_qemu_img(file, &args)?;
    let parsed = if chain {
        serde_json::from_slice(&stdout)
    } else {
        serde_json::from_slice(&stdout).map(|one| vec![one])
    };
    parsed.map_err(|e| DiskError::QemuImgOutput {
        file: file.to_path_buf(),
        command: info_command(chain),
        message: e.to_string(),
    })
}

/// Runs qemu-img; returns its stdout, or an error with its stderr.
fn run_qemu_img(file: &Path, args: &[&OsStr]) -> Result<Vec<u8>, DiskError> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| DiskError::QemuImgSpawn {
            file: file.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push('…');
    }
    Err(DiskError::QemuImg {
        file: file.to_path_buf(),
        command: std::iter::once(OsStr::new("qemu-img"))
            .chain(args.iter().copied())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        status: output.status.to_string(),
        stderr,
    })
}

/// Where qemu looks for `reference` held by the image opened as `holder`: qemu's own
/// answer when it gave one, else the reference against the holder's directory.
fn resolve(holder: &Path, reference: &str, full: Option<&str>) -> PathBuf {
    if let Some(full) = full.filter(|f| Path::new(f).is_absolute()) {
        return PathBuf::from(full);
    }
    let reference = Path::new(reference);
    if reference.is_absolute() {
        return reference.to_path_buf();
    }
    holder
        .parent()
        .map_or_else(|| reference.to_path_buf(), |dir| dir.join(reference))
}

fn canonical(path: &Path) -> Result<PathBuf, DiskError> {
    path.canonicalize().map_err(|source| DiskError::Io {
        file: path.to_path_buf(),
        action: "resolving the path",
        source,
    })
}

/// Refuses images whose data is not all in the file we would ship.
fn check_supported(path: &Path, info: &ImageInfo) -> Result<(), DiskError> {
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|f| f.data.as_ref())
        .and_then(|d| d.get("data-file"))
        .and_then(|d| d.as_str());
    if let Some(data_file) = data_file {
        return Err(DiskError::UnsupportedImage {
            file: path.to_path_buf(),
            reason: format!(
                "its guest data is in the external data file {data_file:?}, which is not supported"
            ),
        });
    }
    if let Some(reference) = &info.backing_filename
        && (reference.starts_with("json:") || reference.contains("://"))
    {
        return Err(DiskError::UnsupportedImage {
            file: path.to_path_buf(),
            reason: format!("its backing file {reference:?} is not a local file"),
        });
    }
    Ok(())
}

/// Walks the chain one `qemu-img info` (without `--backing-chain`, which does not open
/// the backing file) at a time, to name the file whose backing reference loops or
/// points nowhere. `None` when it finds nothing more precise than qemu-img's error.
fn diagnose(top: &Path) -> Option<DiskError> {
    let mut seen = HashSet::new();
    let mut opened_as = top.to_path_buf();
    let mut path = top.canonicalize().ok()?;
    loop {
        seen.insert(path.clone());
        let info = qemu_img_info(&opened_as, false).ok()?.pop()?;
        if let Err(e) = check_supported(&path, &info) {
            return Some(e);
        }
        let reference = info.backing_filename.as_ref()?;
        let resolved = resolve(&opened_as, reference, info.full_backing_filename.as_deref());
        let backing = match resolved.canonicalize() {
            Ok(backing) => backing,
            Err(source) => {
                return Some(DiskError::BackingMissing {
                    file: path,
                    reference: reference.clone(),
                    resolved,
                    source,
                });
            }
        };
        if seen.contains(&backing) {
            return Some(DiskError::BackingLoop {
                file: path,
                backing,
            });
        }
        path = backing;
        opened_as = resolved;
    }
}
