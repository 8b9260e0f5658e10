//! A registry as `registries.conf` makes it: reads go to the mirrors of the
//! reference's table first, in order, then to the primary (its `location`
//! rewrite); the first endpoint whose manifest loads serves the rest of that
//! repository's reads (no per-blob fallback, as containers/image). Writes go to
//! the name as written, as skopeo pushes (with its table's `insecure`). A
//! blocked prefix refuses everything.
//!
//! A repository announced for pushing (`will_access(…, Push)`: a destination) is
//! read where it is written too, so what a push merges with (its signatures,
//! say) is the registry's current state, never a mirror's stale copy.
//!
//! A mirror that fails (refused connection, 404, anything) is passed over at
//! once: the copy engine's retries and their budget see only the primary's error.
//! Once an endpoint served a repository's manifest, every later read of that
//! repository in the run (an index's children, the blobs) goes there alone.
//! Explicit credentials go to the primary and to endpoints at the reference's
//! own `host[:port]`; every other endpoint gets the credentials stored for it,
//! or none. TLS is per endpoint: its own CA from the certificate directories,
//! insecure when its table, mirror entry or the `insecure` key says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sarde_api::oci::Descriptor;
use sarde_api::transport::{Access, BlobReader, BlobWrite, RawManifest, TransportOptions};
use sarde_api::{Digest, Transport, TransportError};

use crate::registries_conf::{Endpoint, RegistriesConf, Resolution};
use crate::transport::RegistryTransport;

/// One registry location with the tables of `registries.conf` that apply.
pub struct ConfiguredRegistry {
    location: String,
    conf: Arc<RegistriesConf>,
    options: TransportOptions,
    /// Opened endpoints by `host[:port]` and insecurity.
    endpoints: Mutex<HashMap<(String, bool), Arc<RegistryTransport>>>,
    /// Where each repository's reads go: the endpoint that served its
    /// manifest, or, for a repository being pushed to, where writes go.
    serving: Mutex<HashMap<String, Endpoint>>,
}

impl std::fmt::Debug for ConfiguredRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfiguredRegistry")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ConfiguredRegistry {
    /// `options.credentials` are the explicit ones (or `None`: each endpoint
    /// looks up its own).
    pub fn new(location: &str, conf: Arc<RegistriesConf>, options: &TransportOptions) -> Self {
        ConfiguredRegistry {
            location: location.to_string(),
            conf,
            options: options.clone(),
            endpoints: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
        }
    }

    fn endpoints_for(
        &self,
        repository: &str,
        by_digest: bool,
    ) -> Result<Vec<Endpoint>, TransportError> {
        match self.conf.resolve(&self.location, repository, by_digest) {
            Resolution::Blocked { prefix, file } => Err(TransportError::Protocol {
                location: self.location.clone(),
                message: format!(
                    "{}/{repository} is blocked: prefix {prefix:?} in {} says `blocked = true`",
                    self.location,
                    file.display()
                ),
            }),
            Resolution::Endpoints(endpoints) => Ok(endpoints),
        }
    }

    /// Where writes go: the name as written, as skopeo pushes (a `location`
    /// rewrite and mirrors are for pulls); its table's `blocked` and
    /// `insecure` still apply.
    fn writing(&self, repository: &str) -> Result<Endpoint, TransportError> {
        self.endpoints_for(repository, false)?;
        let insecure = self
            .conf
            .table_for(&format!("{}/{repository}", self.location))
            .is_some_and(|t| t.insecure);
        Ok(Endpoint {
            location: self.location.clone(),
            repository: repository.to_string(),
            insecure,
            mirror: false,
        })
    }

    fn primary(&self, repository: &str) -> Result<Endpoint, TransportError> {
        let mut endpoints = self.endpoints_for(repository, false)?;
        Ok(endpoints.pop().expect("the primary is always last"))
    }

    /// The endpoint reads of `repository` go to: the one that served its
    /// manifest, else the primary.
    fn reading(&self, repository: &str) -> Result<Endpoint, TransportError> {
        let serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        match serving.get(repository) {
            Some(endpoint) => Ok(endpoint.clone()),
            None => {
                drop(serving);
                self.primary(repository)
            }
        }
    }

    fn open(&self, endpoint: &Endpoint) -> Result<Arc<RegistryTransport>, TransportError> {
        let own = endpoint.location == self.location;
        let configured = self.options.insecure_locations.iter().any(|l| {
            *l == endpoint.location || l == sarde_api::transport::location_host(&endpoint.location)
        });
        let insecure = endpoint.insecure || configured || (own && self.options.insecure);
        let key = (endpoint.location.clone(), insecure);
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = endpoints.get(&key) {
            return Ok(open.clone());
        }
        let mut options = self.options.clone();
        options.insecure = insecure;
        if !own {
            options.ca_file =
                sarde_api::transport::ca_file_in(&self.options.certs_dirs, &endpoint.location);
        }
        if !own && endpoint.mirror {
            // Explicit credentials are the reference's: not for another host's mirror.
            options.credentials = None;
        }
        if insecure && !own {
            tracing::warn!(
                "{}: insecure (plain HTTP or unverified TLS), as registries.conf or the insecure key says",
                endpoint.location
            );
        }
        let opened = Arc::new(crate::transport::open_with_stored_credentials(
            &endpoint.location,
            options,
        )?);
        endpoints.insert(key, opened.clone());
        Ok(opened)
    }
}

#[async_trait]
impl Transport for ConfiguredRegistry {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn will_access(&self, repository: &str, access: Access) {
        if access == Access::Push
            && let Ok(endpoint) = self.writing(repository)
        {
            self.serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(repository.to_string(), endpoint);
        }
        let by_tag = self.endpoints_for(repository, false).unwrap_or_default();
        let by_digest = self.endpoints_for(repository, true).unwrap_or_default();
        for endpoint in by_tag.iter().chain(&by_digest) {
            if endpoint.mirror && access != Access::Pull {
                continue;
            }
            if let Ok(transport) = self.open(endpoint) {
                transport.will_access(&endpoint.repository, access);
            }
        }
    }

    async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest, TransportError> {
        // The endpoint that served this repository serves the rest of it.
        let pinned = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(repository)
            .cloned();
        if let Some(endpoint) = pinned {
            return self
                .open(&endpoint)?
                .get_manifest(&endpoint.repository, reference)
                .await;
        }
        let by_digest = reference.parse::<Digest>().is_ok();
        for endpoint in self.endpoints_for(repository, by_digest)? {
            let answer = match self.open(&endpoint) {
                Ok(transport) => {
                    transport
                        .get_manifest(&endpoint.repository, reference)
                        .await
                }
                Err(e) => Err(e),
            };
            match answer {
                Ok(manifest) => {
                    tracing::info!(
                        "{}/{repository}:{reference} served by {} {}/{}",
                        self.location,
                        if endpoint.mirror { "mirror" } else { "primary" },
                        endpoint.location,
                        endpoint.repository
                    );
                    self.serving
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(repository.to_string(), endpoint);
                    return Ok(manifest);
                }
                Err(e) if endpoint.mirror => {
                    tracing::warn!(
                        "mirror {}/{} of {}/{repository}: {e}; trying the next",
                        endpoint.location,
                        endpoint.repository,
                        self.location
                    );
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the primary is always among the endpoints")
    }

    async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), TransportError> {
        let endpoint = self.writing(repository)?;
        self.open(&endpoint)?
            .put_manifest(&endpoint.repository, reference, manifest)
            .await
    }

    async fn list_tags(&self, repository: &str) -> Result<Vec<String>, TransportError> {
        let endpoint = self.primary(repository)?;
        self.open(&endpoint)?.list_tags(&endpoint.repository).await
    }

    async fn blob_exists(
        &self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let endpoint = self.reading(repository)?;
        self.open(&endpoint)?
            .blob_exists(&endpoint.repository, blob)
            .await
    }

    async fn get_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, TransportError> {
        let endpoint = self.reading(repository)?;
        self.open(&endpoint)?
            .get_blob(&endpoint.repository, blob, offset)
            .await
    }

    async fn put_blob(
        &self,
        repository: &str,
        blob: &Descriptor,
        data: BlobReader,
    ) -> Result<(), TransportError> {
        let endpoint = self.writing(repository)?;
        self.open(&endpoint)?
            .put_blob(&endpoint.repository, blob, data)
            .await
    }

    async fn start_blob_write<'a>(
        &'a self,
        repository: &str,
        blob: &Descriptor,
    ) -> Result<BlobWrite<'a>, TransportError> {
        let endpoint = self.writing(repository)?;
        let transport = self.open(&endpoint)?;
        if transport.blob_exists(&endpoint.repository, blob).await? {
            return Ok(BlobWrite::Present { linked: false });
        }
        Ok(BlobWrite::Write(Box::new(PrimaryBlob {
            transport,
            repository: endpoint.repository,
            blob: blob.clone(),
        })))
    }

    async fn holds_image(
        &self,
        repository: &str,
        manifest: &RawManifest,
        blobs: &[Descriptor],
    ) -> Result<bool, TransportError> {
        // Asked of a destination: only where pushes go counts, never a mirror.
        let endpoint = self.writing(repository)?;
        self.open(&endpoint)?
            .holds_image(&endpoint.repository, manifest, blobs)
            .await
    }

    async fn list_referrers(
        &self,
        repository: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Descriptor>>, TransportError> {
        let endpoint = self.reading(repository)?;
        self.open(&endpoint)?
            .list_referrers(&endpoint.repository, subject, artifact_type)
            .await
    }

    async fn check_credentials(&self) -> Result<(), TransportError> {
        // Where a push would go: the name as written.
        let endpoint = self.writing("")?;
        self.open(&endpoint)?.check_credentials().await
    }

    async fn mount_blob(
        &self,
        repository: &str,
        from_repository: &str,
        blob: &Descriptor,
    ) -> Result<bool, TransportError> {
        let endpoint = self.writing(repository)?;
        let from = self.writing(from_repository)?;
        if from.location != endpoint.location {
            return Ok(false);
        }
        self.open(&endpoint)?
            .mount_blob(&endpoint.repository, &from.repository, blob)
            .await
    }
}

/// A blob written to the primary endpoint from byte 0.
struct PrimaryBlob {
    transport: Arc<RegistryTransport>,
    repository: String,
    blob: Descriptor,
}

#[async_trait]
impl sarde_api::transport::BlobSink for PrimaryBlob {
    fn offset(&self) -> u64 {
        0
    }

    async fn write(&mut self, data: BlobReader) -> Result<(), TransportError> {
        self.transport
            .put_blob(&self.repository, &self.blob, data)
            .await
    }
}
