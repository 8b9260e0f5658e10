//! Keys in cosign's formats, through the `sigstore` crate: a private key as
//! cosign and skopeo write it (`ENCRYPTED SIGSTORE PRIVATE KEY`: PKCS#8 sealed
//! with scrypt and NaCl secretbox; the older `ENCRYPTED COSIGN PRIVATE KEY`
//! label reads too), a public key as PEM (`PUBLIC KEY`, SubjectPublicKeyInfo).

use std::path::Path;

use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, SigningScheme};
use zeroize::Zeroizing;

use crate::TrustError;

/// A key pair to sign with.
pub struct PrivateKey {
    signer: SigStoreSigner,
}

impl PrivateKey {
    /// Reads an encrypted private key; `passphrase` may be empty (cosign allows it).
    pub fn load(path: &Path, passphrase: &[u8]) -> Result<Self, TrustError> {
        let pem = std::fs::read(path).map_err(|e| TrustError::Key {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::from_encrypted_pem(&pem, passphrase).map_err(|message| TrustError::Key {
            path: path.display().to_string(),
            message,
        })
    }

    /// Decrypts cosign's encrypted PEM.
    pub fn from_encrypted_pem(pem: &[u8], passphrase: &[u8]) -> Result<Self, String> {
        let pair = SigStoreKeyPair::from_encrypted_pem(pem, passphrase).map_err(|e| {
            format!(
                "not a cosign private key this passphrase opens ({e}); it must be an \
                 `ENCRYPTED SIGSTORE PRIVATE KEY` as `sarde key generate`, `cosign generate-key-pair` \
                 or `skopeo generate-sigstore-key` write it"
            )
        })?;
        let scheme = match &pair {
            SigStoreKeyPair::ECDSA(keys) => match keys {
                sigstore::crypto::signing_key::ecdsa::ECDSAKeys::P256(_) => {
                    SigningScheme::ECDSA_P256_SHA256_ASN1
                }
                sigstore::crypto::signing_key::ecdsa::ECDSAKeys::P384(_) => {
                    SigningScheme::ECDSA_P384_SHA384_ASN1
                }
            },
            SigStoreKeyPair::ED25519(_) => SigningScheme::ED25519,
            SigStoreKeyPair::RSA(_) => SigningScheme::RSA_PKCS1_SHA256(0),
        };
        let signer = pair
            .to_sigstore_signer(&scheme)
            .map_err(|e| format!("cannot sign with it: {e}"))?;
        Ok(PrivateKey { signer })
    }

    /// A new P-256 key, as cosign generates.
    pub fn generate() -> Result<Self, TrustError> {
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
            .create_signer()
            .map_err(|e| TrustError::Crypto(format!("cannot generate a key: {e}")))?;
        Ok(PrivateKey { signer })
    }

    /// The private key encrypted with `passphrase`, in cosign's format.
    pub fn to_encrypted_pem(&self, passphrase: &[u8]) -> Result<Zeroizing<String>, TrustError> {
        self.signer
            .to_sigstore_keypair()
            .and_then(|pair| pair.private_key_to_encrypted_pem(passphrase))
            .map_err(|e| TrustError::Crypto(format!("cannot encrypt the key: {e}")))
    }

    /// The public key as PEM.
    pub fn public_key_pem(&self) -> Result<String, TrustError> {
        self.signer
            .to_sigstore_keypair()
            .and_then(|pair| pair.public_key_to_pem())
            .map_err(|e| TrustError::Crypto(format!("cannot export the public key: {e}")))
    }

    /// The public key, to verify with.
    pub fn public_key(&self) -> Result<PublicKey, TrustError> {
        let key = self
            .signer
            .to_verification_key()
            .map_err(|e| TrustError::Crypto(format!("cannot derive the public key: {e}")))?;
        Ok(PublicKey {
            key,
            origin: "the signing key".to_string(),
        })
    }

    /// Signs `payload`; the signature base64-encoded, as cosign stores it.
    pub fn sign(&self, payload: &[u8]) -> Result<String, TrustError> {
        use base64::Engine as _;
        let raw = self
            .signer
            .sign(payload)
            .map_err(|e| TrustError::Crypto(format!("cannot sign: {e}")))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// A public key a policy trusts, and where it came from (for messages).
pub struct PublicKey {
    key: CosignVerificationKey,
    pub origin: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("origin", &self.origin)
            .finish()
    }
}

impl PublicKey {
    /// Parses a PEM public key (ECDSA P-256/P-384, Ed25519 or RSA).
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, TrustError> {
        let key = CosignVerificationKey::try_from_pem(pem).map_err(|e| TrustError::Key {
            path: origin.to_string(),
            message: format!("not a PEM public key ({e})"),
        })?;
        Ok(PublicKey {
            key,
            origin: origin.to_string(),
        })
    }

    /// Reads a PEM public key file.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let pem = std::fs::read(path).map_err(|e| TrustError::Key {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Whether `signature` (base64, as in the annotation) signs `payload`.
    pub fn verifies(&self, payload: &[u8], signature: &str) -> bool {
        self.key
            .verify_signature(
                sigstore::crypto::Signature::Base64Encoded(signature.trim().as_bytes()),
                payload,
            )
            .is_ok()
    }
}
