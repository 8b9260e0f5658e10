//! `clone`: a VM as copy-on-write overlays of another's disks. The source VM is
//! never started and never written: each writable disk gets a qcow2 overlay whose
//! backing file is the source's disk, so a clone costs the same for 1 GiB and
//! 60 GiB.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sarde_api::Hypervisor;
use sarde_api::hypervisor::DomainState;
use serde::Serialize;

use crate::{Engine, EngineError, Result};

/// What happens to the clone once made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneStart {
    /// Define it, leave it stopped.
    Define,
    /// Define it and start it.
    Persistent,
    /// Start it as a transient domain; its overlays are unlinked once QEMU holds
    /// them open, so they disappear with it.
    Ephemeral,
    /// Make the overlays and print the domain XML; define nothing.
    PrintXml,
}

/// What to clone.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    /// The source VM.
    pub source: String,
    /// The clone's name; `<source>-clone[-N]` when `None`.
    pub name: Option<String>,
    /// Where the overlays go; next to each source disk when `None`.
    pub clonedir: Option<PathBuf>,
    /// The first interface's MAC; a new one from libvirt when `None`.
    pub mac: Option<String>,
    pub start: CloneStart,
}

/// What a clone made.
#[derive(Debug, Clone, Serialize)]
pub struct CloneOutcome {
    pub name: String,
    pub source: String,
    /// The domain's UUID (none for print-xml).
    pub uuid: Option<String>,
    pub overlays: Vec<PathBuf>,
    /// The clone's domain XML (for print-xml).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xml: Option<String>,
    pub start: CloneStart,
}

/// The overlay file of one disk of a clone.
pub fn overlay_path(dir: &Path, clone: &str, target: &str) -> PathBuf {
    dir.join(format!("{clone}-{target}.qcow2"))
}

fn nvram_path(dir: &Path, clone: &str) -> PathBuf {
    dir.join(format!("{clone}_VARS.fd"))
}

impl Engine {
    pub fn clone_vm(&self, request: &CloneRequest) -> Result<CloneOutcome> {
        // Shared with other clones, exclusive for imports and removals of the
        // source: it is neither replaced nor removed while its disks get overlays.
        let _source_lock = self.share_vm_lock(&request.source)?;
        let hv = self.registry.connect(&self.connect)?;
        if !hv.exists(&request.source)? {
            return Err(EngineError::Refused(format!(
                "no VM {:?} on {}: name a VM, or an image to pull",
                request.source, self.connect
            )));
        }
        match hv.state(&request.source)? {
            DomainState::Stopped => {}
            state => {
                return Err(EngineError::Refused(format!(
                    "VM {:?} is {state:?}: a clone's disks are overlays on the source's, which must not change while clones use them; shut it down first",
                    request.source
                )));
            }
        }
        let name = match &request.name {
            Some(n) => {
                if hv.exists(n)? {
                    return Err(EngineError::Refused(format!(
                        "a VM named {n:?} already exists: choose another name"
                    )));
                }
                n.clone()
            }
            None => free_name(hv.as_ref(), &request.source)?,
        };
        let xml = hv.domain_xml(&request.source, true)?;
        let disks = sarde_domain::file_disk_sources(&xml)?;
        let mut overlays = BTreeMap::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<String> {
            for disk in &disks {
                if disk.device != "disk" {
                    continue;
                }
                let dir = match &request.clonedir {
                    Some(d) => d.clone(),
                    None => disk
                        .source
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from(".")),
                };
                fs::create_dir_all(&dir)
                    .map_err(EngineError::io(&dir, "creating the clone directory"))?;
                let overlay = overlay_path(&dir, &name, &disk.target);
                if overlay.exists() {
                    return Err(EngineError::Refused(format!(
                        "{} exists already: a leftover of an earlier clone named {name:?}? remove it first",
                        overlay.display()
                    )));
                }
                let format = match &disk.driver_type {
                    Some(f) => f.clone(),
                    None => sarde_disk::inspect(&disk.source)?.format,
                };
                made.push(overlay.clone());
                sarde_disk::create_overlay(&overlay, &disk.source, &format)?;
                overlays.insert(disk.target.clone(), overlay);
            }
            let nvram = match sarde_domain::nvram_file(&xml)? {
                Some(source) if source.is_file() => {
                    let dir = request
                        .clonedir
                        .clone()
                        .or_else(|| source.parent().map(Path::to_path_buf))
                        .unwrap_or_else(|| PathBuf::from("."));
                    let copy = nvram_path(&dir, &name);
                    made.push(copy.clone());
                    fs::copy(&source, &copy)
                        .map_err(EngineError::io(&copy, "copying the NVRAM file"))?;
                    Some(copy)
                }
                _ => None,
            };
            Ok(sarde_domain::prepare_clone(
                &xml,
                &sarde_domain::CloneSpec {
                    name: name.clone(),
                    overlays,
                    nvram,
                    mac: request.mac.clone(),
                },
            )?)
        })();
        let clone_xml = match result {
            Ok(x) => x,
            Err(e) => {
                remove_files(&made);
                return Err(e);
            }
        };
        let started = (|| -> Result<Option<String>> {
            match request.start {
                CloneStart::PrintXml => Ok(None),
                CloneStart::Define => Ok(Some(hv.define(&clone_xml)?)),
                CloneStart::Persistent => {
                    let uuid = hv.define(&clone_xml)?;
                    if let Err(e) = hv.start(&name) {
                        let _ = hv.undefine(&name);
                        return Err(e.into());
                    }
                    Ok(Some(uuid))
                }
                CloneStart::Ephemeral => {
                    let uuid = hv.create_transient(&clone_xml)?;
                    // QEMU holds the files open: unlinked now, they vanish with it.
                    remove_files(&made);
                    Ok(Some(uuid))
                }
            }
        })();
        let uuid = match started {
            Ok(uuid) => uuid,
            Err(e) => {
                remove_files(&made);
                return Err(e);
            }
        };
        self.record_vm_use(&request.source);
        Ok(CloneOutcome {
            name,
            source: request.source.clone(),
            uuid,
            overlays: made,
            xml: (request.start == CloneStart::PrintXml).then_some(clone_xml),
            start: request.start,
        })
    }

    /// Destroys and removes a clone and its overlays: stops it if it runs,
    /// undefines it if defined, deletes `<dir>/<name>-*.qcow2` and its NVRAM copy
    /// in each of `dirs`. Harmless when nothing is left; returns what it did.
    pub fn remove_clone(&self, name: &str, dirs: &[PathBuf]) -> Result<Vec<String>> {
        let hv = self.registry.connect(&self.connect)?;
        let mut done = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        if hv.exists(name)? {
            // The overlays the domain names, wherever they are.
            if let Ok(xml) = hv.domain_xml(name, false) {
                for d in sarde_domain::file_disk_sources(&xml).unwrap_or_default() {
                    let is_overlay =
                        d.source
                            .file_name()
                            .and_then(|f| f.to_str())
                            .is_some_and(|f| {
                                f.starts_with(&format!("{name}-")) && f.ends_with(".qcow2")
                            });
                    if is_overlay {
                        files.push(d.source);
                    }
                }
            }
            if hv.state(name)? != DomainState::Stopped {
                match hv.destroy(name) {
                    Ok(()) => done.push(format!("destroyed {name}")),
                    // Gone in between (a transient domain that stopped).
                    Err(_) if !hv.exists(name)? => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if hv.exists(name)? {
                hv.undefine(name)?;
                done.push(format!("undefined {name}"));
            }
        }
        for dir in dirs {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some(f) = file_name.to_str() else {
                    continue;
                };
                let ours = (f.starts_with(&format!("{name}-")) && f.ends_with(".qcow2"))
                    || f == format!("{name}_VARS.fd");
                if ours {
                    files.push(entry.path());
                }
            }
        }
        files.sort();
        files.dedup();
        for f in files {
            match fs::remove_file(&f) {
                Ok(()) => done.push(format!("removed {}", f.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io(&f, "removing the overlay")(e)),
            }
        }
        Ok(done)
    }
}

fn remove_files(files: &[PathBuf]) {
    for f in files {
        let _ = fs::remove_file(f);
    }
}

/// `<source>-clone`, then `<source>-clone-2`, … the first name not taken.
fn free_name(hv: &dyn Hypervisor, source: &str) -> Result<String> {
    let base = format!("{source}-clone");
    if !hv.exists(&base)? {
        return Ok(base);
    }
    for n in 2..10_000 {
        let candidate = format!("{base}-{n}");
        if !hv.exists(&candidate)? {
            return Ok(candidate);
        }
    }
    Err(EngineError::Refused(format!(
        "no free clone name after {base}-9999: name the clone"
    )))
}
