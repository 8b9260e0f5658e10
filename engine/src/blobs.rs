//! Where import reads blobs: a layout of the cache, optionally while a fetch is
//! still filling it (`sarde pull` streams pieces into the VM's disks as they
//! arrive). Waiting happens here, so import code reads blobs one way.

use std::fs::File;
use std::path::PathBuf;

use sarde_api::Digest;
use sarde_api::oci::Descriptor;
use sarde_transfer::BlobGate;
use sarde_transport_oci_dir::Layout;

use crate::{EngineError, Result};

pub(crate) struct Blobs<'a> {
    pub layout: &'a Layout,
    pub gate: Option<&'a BlobGate>,
}

impl Blobs<'_> {
    fn wait(&self, digest: &Digest) -> Result<()> {
        match self.gate {
            Some(gate) => gate.wait(digest).map_err(|message| {
                EngineError::Refused(format!("the download of the image failed: {message}"))
            }),
            None => Ok(()),
        }
    }

    pub fn read_blob(&self, blob: &Descriptor) -> Result<Vec<u8>> {
        self.wait(&blob.digest)?;
        Ok(self.layout.read_blob(blob)?)
    }

    pub fn open_blob(&self, blob: &Descriptor) -> Result<File> {
        self.wait(&blob.digest)?;
        Ok(self.layout.open_blob(blob)?)
    }

    /// Whether a fetch of this process downloaded `digest` and verified it by size
    /// and digest a moment ago (blobs it found in the cache were not hashed).
    pub fn verified_now(&self, digest: &Digest) -> bool {
        self.gate.is_some_and(|gate| gate.verified_here(digest))
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.layout.blob_path(digest)
    }
}
