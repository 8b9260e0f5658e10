//! # sarde-transport-oci-layout
//!
//! The `oci` transport: one OCI image layout directory named by a reference as
//! containers/image (skopeo, podman) names it, `oci:PATH[:REF]`. The path ends at
//! the first `:`; REF is the tag (the index's `org.opencontainers.image.ref.name`).
//! Without one, as in skopeo, a read takes the layout's only image and a write
//! adds the image untagged. The directory is read and written by the cache's layout
//! code (`sarde-transport-oci-dir`), so blobs are verified and committed the same way.

use std::sync::Arc;

use sarde_api::transport::{TransportOptions, TransportReference, path_and_tag, require_path};
use sarde_api::{Registrar, RegistryError, Transport, TransportError, TransportFactory};
use sarde_transport_oci_dir::OciDirTransport;

/// The URL scheme of this transport, as in skopeo.
pub const SCHEME: &str = "oci";
const SYNTAX: &str = "oci:PATH[:TAG]";

/// Opens `oci` transports.
#[derive(Debug, Clone, Copy, Default)]
pub struct OciLayoutFactory;

impl TransportFactory for OciLayoutFactory {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn description(&self) -> &str {
        "an OCI image layout directory, as skopeo's oci: (PATH ends at the first ':'; without TAG: the only image when read, untagged when written): oci:PATH[:TAG]"
    }

    fn parse_reference(&self, rest: &str) -> Result<TransportReference, TransportError> {
        path_and_tag(SCHEME, rest, SYNTAX)
    }

    fn open(
        &self,
        location: &str,
        _options: &TransportOptions,
    ) -> Result<Box<dyn Transport>, TransportError> {
        require_path(SCHEME, location, SYNTAX)?;
        Ok(Box::new(OciDirTransport::layout(location)))
    }
}

/// Registers [`OciLayoutFactory`] under `oci`.
pub fn register(r: &mut dyn Registrar) -> Result<(), RegistryError> {
    r.register_transport(Arc::new(OciLayoutFactory))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(rest: &str) -> Result<TransportReference, TransportError> {
        OciLayoutFactory.parse_reference(rest)
    }

    #[test]
    fn path_then_tag_as_skopeo_splits_them() {
        let r = parse("/srv/images/win11:2024-06").unwrap();
        assert_eq!(r.location, "/srv/images/win11");
        assert_eq!(r.reference, "2024-06");
        assert_eq!(r.tag.as_deref(), Some("2024-06"));
        let r = parse("relative/dir").unwrap();
        assert_eq!(
            (r.location.as_str(), r.reference.as_str(), r.tag),
            ("relative/dir", "", None)
        );
        assert_eq!(parse("d:").unwrap().reference, "");
    }

    #[test]
    fn bad_references_say_the_syntax() {
        let e = parse(":x").unwrap_err().to_string();
        assert!(e.contains("no path") && e.contains(SYNTAX), "{e}");
        let e = parse("d:a/b").unwrap_err().to_string();
        assert!(e.contains("tag") && e.contains(SYNTAX), "{e}");
    }
}
