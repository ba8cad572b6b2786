//! The coordinator's data dir: where the CA, the operator token and the database live, and
//! loading or creating the federation CA there.

use std::path::{Path, PathBuf};

use sovra_proto::ca::FederationCa;
use tracing::info;

use crate::error::CoordinatorError;

/// Files the coordinator keeps in its data dir.
pub struct DataDir {
    /// The folder.
    pub root: PathBuf,
}

impl DataDir {
    /// CA certificate (handed to clients).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// CA key (0600).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca-key.pem")
    }
    /// Operator token (0600).
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    /// The sled database.
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }
}

/// Writes `contents` to `path` readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

pub(crate) fn load_or_create_ca(dir: &DataDir) -> Result<FederationCa, CoordinatorError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        CoordinatorError::Io(format!("{what} {}: {e}", path.display()))
    };
    if dir.ca_cert().exists() {
        let cert =
            std::fs::read_to_string(dir.ca_cert()).map_err(|e| io("reading", &dir.ca_cert(), e))?;
        let key =
            std::fs::read_to_string(dir.ca_key()).map_err(|e| io("reading", &dir.ca_key(), e))?;
        return FederationCa::from_pem(&cert, &key)
            .map_err(|e| CoordinatorError::Internal(e.to_string()));
    }
    let name = dir
        .root
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("sovra")
        .to_string();
    let ca =
        FederationCa::generate(&name).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    write_private(&dir.ca_key(), ca.key_pem()).map_err(|e| io("writing", &dir.ca_key(), e))?;
    std::fs::write(dir.ca_cert(), ca.cert_pem()).map_err(|e| io("writing", &dir.ca_cert(), e))?;
    info!(fingerprint = %ca.fingerprint(), "federation CA created");
    Ok(ca)
}

pub(crate) fn pem_to_der(pem: &str) -> Result<Vec<u8>, CoordinatorError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| CoordinatorError::Internal(format!("issued certificate does not parse: {e}")))
}
