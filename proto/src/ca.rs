//! The federation certificate authority.
//!
//! In a sovra federation the coordinator is the certificate authority (CA).
//! This module holds everything certificate related:
//!
//! * [`FederationCa`] creates (or reloads) the CA, issues the coordinator's
//!   own TLS server certificate and signs the certificate signing requests
//!   (CSRs) that workers send when they join.
//! * [`generate_worker_key_and_csr`] is the worker side of joining: a fresh
//!   key pair that never leaves the worker, and a CSR for it.
//! * [`discover_ca`] is the worker's first contact with the coordinator, in
//!   the style of kubeadm's discovery token CA cert hash: the join token
//!   carries the SHA-256 fingerprint of the CA certificate, and the worker
//!   accepts the coordinator's TLS chain only if it contains that CA and the
//!   coordinator's certificate verifies against it. The returned CA
//!   certificate is then pinned for every later connection.
//! * [`worker_identity`] reads the worker id and provider back from a worker
//!   certificate that TLS has already verified against the CA.
//!
//! All keys are ECDSA P-256; all cryptography is `ring` (through rcgen and
//! rustls), never aws-lc.
//!
//! Certificate layout:
//!
//! * CA: CN `sovra federation CA <name>`, O `sovra`, CA:true with path
//!   length 0 (it signs leaves only), valid [`CA_VALID_DAYS`] days.
//! * Coordinator: CN = first advertised name, O `sovra`, OU
//!   [`COORDINATOR_OU`], SANs = the advertised names, server auth only.
//! * Worker: CN = worker id, O = provider, OU [`WORKER_OU`], SAN DNS = worker
//!   id and its data-plane addresses, SAN URI `sovra://worker/<id>`, client
//!   and server auth (the data plane verifies both ends against the CA).
//!
//! Security note for callers: every certificate signed by the CA is trusted
//! for the names it carries. [`FederationCa::sign_worker_csr`] refuses nothing
//! based on *which* names are asked for, so the caller must not let a worker
//! claim the coordinator's advertised names (or another worker's id) as its
//! worker id or address. [`discover_ca`] additionally refuses a server that
//! presents a worker certificate.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, DnsName, ServerName, UnixTime,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// Organizational unit (OU) of every worker certificate.
pub const WORKER_OU: &str = "sovra-worker";
/// Organizational unit (OU) of the coordinator's server certificate.
pub const COORDINATOR_OU: &str = "sovra-coordinator";
/// Organization (O) of the CA and coordinator certificates.
pub const FEDERATION_ORG: &str = "sovra";
/// Validity of the federation CA certificate, in days (10 years).
pub const CA_VALID_DAYS: u32 = 3650;
/// Validity of the coordinator's server certificate, in days.
pub const SERVER_CERT_VALID_DAYS: u32 = 365;
/// Longest validity [`FederationCa::sign_worker_csr`] accepts, in days.
pub const MAX_WORKER_VALID_DAYS: u32 = 3650;
/// Certificates start this long before "now", to tolerate clock skew.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const SECONDS_PER_DAY: u64 = 86_400;

/// Everything that can go wrong while creating, loading, issuing or
/// discovering certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen could not build or sign a key, certificate or CSR.
    #[error("could not create the {what}: {source}")]
    Generate {
        /// What was being created.
        what: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed; no certificate was issued")]
    Random,
    /// The system clock reads a time before 1970.
    #[error("the system clock is set before 1970; fix the clock before issuing certificates")]
    Clock,
    /// The CA certificate given to [`FederationCa::from_pem`] is unusable.
    #[error("the federation CA certificate is not usable: {0}")]
    InvalidCaCertificate(String),
    /// The CA private key given to [`FederationCa::from_pem`] is unusable.
    #[error("the federation CA private key is not usable: {0}")]
    InvalidCaKey(String),
    /// The CA private key does not belong to the CA certificate.
    #[error(
        "the federation CA private key does not belong to the CA certificate \
         (are the key and certificate files from the same federation?)"
    )]
    CaKeyMismatch,
    /// A name to put in a certificate is neither a DNS name nor an IP address.
    #[error("{name:?} cannot be put in a certificate: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An argument is empty or out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A worker's certificate signing request was refused.
    #[error("the worker's certificate signing request was refused: {0}")]
    InvalidCsr(String),
    /// A certificate is not a sovra worker certificate.
    #[error("the certificate is not a sovra worker certificate: {0}")]
    NotWorkerCertificate(String),
    /// A CA fingerprint (for example from a join token) is malformed.
    #[error(
        "{0:?} is not a CA fingerprint: expected the 64 hex digits of a SHA-256 hash, \
         optionally prefixed by \"sha256:\""
    )]
    InvalidFingerprint(String),
    /// The coordinator presented a CA other than the one the join token names.
    #[error(
        "the coordinator at {addr} presents CA fingerprint {found}, but the join token \
         expects {expected}: the token was not issued by this coordinator \
         (or someone is intercepting the connection)"
    )]
    FingerprintMismatch {
        /// The address that was contacted.
        addr: String,
        /// The fingerprint the caller expected (normalized lowercase hex).
        expected: String,
        /// The fingerprint of the last certificate in the presented chain.
        found: String,
    },
    /// The TCP connection to the coordinator could not be opened.
    #[error("could not connect to the coordinator at {addr}: {source}")]
    Connect {
        /// The address that was contacted.
        addr: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed for a reason other than a fingerprint mismatch.
    #[error("TLS handshake with the coordinator at {addr} failed: {message}")]
    Tls {
        /// The address that was contacted.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// Connecting and the TLS handshake did not finish in time.
    #[error("the coordinator at {addr} did not complete a TLS handshake within {timeout:?}")]
    Timeout {
        /// The address that was contacted.
        addr: String,
        /// The time allowed.
        timeout: Duration,
    },
}

/// The federation CA: a self-signed CA certificate and its key, both PEM.
pub struct FederationCa {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("FederationCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl FederationCa {
    /// Creates a new CA: an ECDSA P-256 key and a self-signed CA:true
    /// certificate valid for 10 years, CN `sovra federation CA <name>`.
    pub fn generate(federation_name: &str) -> Result<Self, CaError> {
        if federation_name.trim().is_empty() {
            return Err(CaError::InvalidArgument(
                "the federation name must not be empty".into(),
            ));
        }
        let key = new_key("federation CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&[
            (
                DnType::CommonName,
                &format!("sovra federation CA {federation_name}"),
            ),
            (DnType::OrganizationName, FEDERATION_ORG),
        ]);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, CA_VALID_DAYS)?;
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("federation CA certificate"))?;
        Ok(Self {
            cert_pem: der_to_pem("CERTIFICATE", cert.der()),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reloads a CA saved with [`cert_pem`](Self::cert_pem) and
    /// [`key_pem`](Self::key_pem). Checks that the certificate is a CA
    /// certificate and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            CaError::InvalidCaCertificate(format!("no PEM \"CERTIFICATE\" block found ({e})"))
        })?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            CaError::InvalidCaKey(format!("it is not a PEM private key rcgen can use ({e})"))
        })?;
        check_ca_cert(&cert_der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::InvalidCaCertificate(e.to_string()))?;
        Ok(Self {
            cert_pem: der_to_pem("CERTIFICATE", &cert_der),
            key_pem: issuer.key().serialize_pem(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, PEM (one `CERTIFICATE` block).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8). Keep it secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.to_vec()
    }

    /// Lowercase hex SHA-256 of the CA certificate DER: what join tokens carry.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.cert_der)
    }

    /// Server certificate for the coordinator, SANs = the advertised names
    /// (DNS names or IP literals, e.g. "localhost", "127.0.0.1",
    /// "coord.example.eu"), valid [`SERVER_CERT_VALID_DAYS`] days. Returns
    /// (chain_pem = leaf followed by the CA cert, key_pem).
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String), CaError> {
        let Some(first) = names.first() else {
            return Err(CaError::InvalidArgument(
                "the coordinator certificate needs at least one DNS name or IP address".into(),
            ));
        };
        let sans = names
            .iter()
            .map(|n| san_for(n))
            .collect::<Result<Vec<_>, _>>()?;
        let dn = distinguished_name(&[
            (DnType::CommonName, first),
            (DnType::OrganizationName, FEDERATION_ORG),
            (DnType::OrganizationalUnitName, COORDINATOR_OU),
        ]);
        let ekus = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let params = leaf_params(dn, sans, ekus, SERVER_CERT_VALID_DAYS)?;
        let key = new_key("coordinator key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err("coordinator certificate"))?;
        let chain = format!("{}{}", der_to_pem("CERTIFICATE", cert.der()), self.cert_pem);
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a worker's CSR (PEM). The CSR's own subject and SANs are ignored
    /// (untrusted); only its public key is used, after checking the CSR's
    /// signature proves possession of the matching private key.
    ///
    /// The certificate gets CN = `worker_id`, O = `provider`, OU
    /// [`WORKER_OU`], SAN DNS = `worker_id` plus every name in `addresses`
    /// (DNS names or IP literals), a URI SAN `sovra://worker/<worker_id>`,
    /// client and server auth, and is valid `valid_days` days (1 to
    /// [`MAX_WORKER_VALID_DAYS`]). Returns the certificate PEM.
    pub fn sign_worker_csr(
        &self,
        csr_pem: &str,
        worker_id: &str,
        provider: &str,
        addresses: &[String],
        valid_days: u32,
    ) -> Result<String, CaError> {
        check_worker_args(worker_id, provider, valid_days)?;
        let public_key = verified_csr_public_key(csr_pem)?;
        let mut sans = vec![san_for(worker_id)?];
        for address in addresses {
            sans.push(san_for(address)?);
        }
        let uri = format!("sovra://worker/{worker_id}");
        sans.push(SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(|_| invalid_name(&uri, "it is not ASCII"))?,
        ));
        let dn = distinguished_name(&[
            (DnType::CommonName, worker_id),
            (DnType::OrganizationName, provider),
            (DnType::OrganizationalUnitName, WORKER_OU),
        ]);
        let ekus = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let params = leaf_params(dn, sans, ekus, valid_days)?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(gen_err("worker certificate"))?;
        Ok(der_to_pem("CERTIFICATE", cert.der()))
    }
}

/// Worker side of joining: a fresh ECDSA P-256 key pair and a CSR for it
/// (CN = `worker_name`, informational only). Returns (key PEM, CSR PEM).
pub fn generate_worker_key_and_csr(worker_name: &str) -> Result<(String, String), CaError> {
    let key = new_key("worker key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&[(DnType::CommonName, worker_name)]);
    let csr = params
        .serialize_request(&key)
        .map_err(gen_err("worker certificate signing request"))?;
    let csr_pem = csr
        .pem()
        .map_err(gen_err("worker certificate signing request"))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Identity read back from a worker certificate presented by a peer, after
/// TLS verified that it chains to the federation CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// The worker id (the certificate's CN).
    pub worker_id: String,
    /// The provider operating the worker (the certificate's O).
    pub provider: String,
}

/// Reads the worker id (CN) and provider (O) of a worker certificate (DER),
/// checking that its OU is [`WORKER_OU`]. Does NOT verify the certificate:
/// call it only on a certificate TLS has verified against the CA.
pub fn worker_identity(cert_der: &[u8]) -> Result<WorkerIdentity, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CaError::NotWorkerCertificate(format!("it does not parse ({e})")))?;
    let subject = cert.subject();
    let ou = single_attribute(
        subject.iter_organizational_unit(),
        "organizational unit (OU)",
    )?;
    if ou != WORKER_OU {
        return Err(CaError::NotWorkerCertificate(format!(
            "its organizational unit is {ou:?}, not {WORKER_OU:?}"
        )));
    }
    Ok(WorkerIdentity {
        worker_id: single_attribute(subject.iter_common_name(), "common name (CN)")?,
        provider: single_attribute(subject.iter_organization(), "organization (O)")?,
    })
}

/// Lowercase hex SHA-256 of `der`.
pub fn fingerprint_der(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// First contact with the coordinator (like kubeadm's discovery hash).
///
/// Connects with TLS to `addr` (host:port) with `server_name` as SNI and
/// accepts the server's chain only if one presented certificate has SHA-256
/// `ca_fingerprint` (hex, optionally `sha256:`-prefixed, colons allowed) and
/// the leaf verifies, for `server_name`, against that certificate as the sole
/// root. A leaf that is a worker certificate is refused. The whole exchange is
/// bounded by `timeout`. Returns the CA certificate PEM, to be pinned.
pub async fn discover_ca(
    addr: &str,
    server_name: &str,
    ca_fingerprint: &str,
    timeout: Duration,
) -> Result<String, CaError> {
    let expected = normalize_fingerprint(ca_fingerprint)?;
    let sni = ServerName::try_from(server_name.to_owned())
        .map_err(|_| invalid_name(server_name, "it is not a valid DNS name or IP address"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(FingerprintVerifier::new(expected.clone(), provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(addr, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| CaError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let mut tls = connector
            .connect(sni, tcp)
            .await
            .map_err(|e| verifier.handshake_error(addr, e))?;
        // Best effort close_notify; the CA is already verified.
        let _ = tls.shutdown().await;
        Ok::<_, CaError>(())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CaError::Timeout {
            addr: addr.to_owned(),
            timeout,
        })??;
    let ca = verifier
        .outcome()
        .pinned
        .ok_or_else(|| tls_err(addr, "the handshake finished without verifying a CA".into()))?;
    Ok(der_to_pem("CERTIFICATE", &ca))
}

/// What the discovery verifier saw, read back after the handshake.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// The CA certificate the chain verified against.
    pinned: Option<CertificateDer<'static>>,
    /// Fingerprint of the presented root when no certificate matched.
    mismatch: Option<String>,
    /// Human-readable reason of any other refusal.
    failure: Option<String>,
}

/// Server certificate verifier for [`discover_ca`]: trust on the expected
/// CA fingerprint, then ordinary WebPKI verification against that CA alone.
#[derive(Debug)]
struct FingerprintVerifier {
    expected: String,
    provider: Arc<CryptoProvider>,
    outcome: Mutex<Outcome>,
}

impl FingerprintVerifier {
    fn new(expected: String, provider: Arc<CryptoProvider>) -> Self {
        Self {
            expected,
            provider,
            outcome: Mutex::new(Outcome::default()),
        }
    }

    fn outcome(&self) -> Outcome {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, update: impl FnOnce(&mut Outcome)) {
        update(&mut self.outcome.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn refuse(&self, reason: String, error: CertificateError) -> rustls::Error {
        self.record(|o| o.failure = Some(reason));
        rustls::Error::InvalidCertificate(error)
    }

    /// Turns a failed handshake into the most precise [`CaError`].
    fn handshake_error(&self, addr: &str, error: std::io::Error) -> CaError {
        let outcome = self.outcome();
        if let Some(found) = outcome.mismatch {
            return CaError::FingerprintMismatch {
                addr: addr.to_owned(),
                expected: self.expected.clone(),
                found,
            };
        }
        tls_err(addr, outcome.failure.unwrap_or_else(|| error.to_string()))
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = std::iter::once(end_entity).chain(intermediates);
        let Some(ca) = presented
            .clone()
            .find(|c| fingerprint_der(c) == self.expected)
        else {
            let root = presented.last().unwrap_or(end_entity);
            self.record(|o| o.mismatch = Some(fingerprint_der(root)));
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| {
            let why = format!("the certificate with the expected fingerprint is not a CA ({e})");
            self.refuse(why, CertificateError::UnknownIssuer)
        })?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                let why = format!(
                    "the server's certificate does not verify against the expected CA \
                     for {server_name:?}: {e}"
                );
                self.refuse(why, CertificateError::ApplicationVerificationFailure)
            })?;
        if worker_identity(end_entity).is_ok() {
            let why = "the server presented a sovra worker certificate, \
                       not the coordinator's certificate";
            return Err(self.refuse(why.into(), CertificateError::ApplicationVerificationFailure));
        }
        self.record(|o| o.pinned = Some(ca.clone().into_owned()));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Generate { what, source }
}

fn tls_err(addr: &str, message: String) -> CaError {
    CaError::Tls {
        addr: addr.to_owned(),
        message,
    }
}

fn invalid_name(name: &str, reason: &'static str) -> CaError {
    CaError::InvalidName {
        name: name.to_owned(),
        reason,
    }
}

fn new_key(what: &'static str) -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err(what))
}

fn distinguished_name(entries: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in entries {
        dn.push(ty.clone(), *value);
    }
    dn
}

/// A random, positive, 16-byte serial number.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Valid from now minus [`CLOCK_SKEW`] for `days` days. `days` must be at
/// most a few thousand (callers bound it) so the date stays representable.
fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CaError> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Clock)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::from_secs(u64::from(days) * SECONDS_PER_DAY);
    Ok(())
}

/// Parameters shared by the coordinator and worker leaf certificates.
fn leaf_params(
    dn: DistinguishedName,
    mut sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
) -> Result<CertificateParams, CaError> {
    let mut unique = Vec::with_capacity(sans.len());
    sans.retain(|san| {
        let fresh = !unique.contains(san);
        if fresh {
            unique.push(san.clone());
        }
        fresh
    });
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, days)?;
    Ok(params)
}

/// A SAN for a DNS name or an IP literal.
fn san_for(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    DnsName::try_from(name)
        .map_err(|_| invalid_name(name, "it is not a valid DNS name or IP address"))?;
    let ia5 = name
        .try_into()
        .map_err(|_| invalid_name(name, "it is not ASCII"))?;
    Ok(SanType::DnsName(ia5))
}

fn check_worker_args(worker_id: &str, provider: &str, valid_days: u32) -> Result<(), CaError> {
    if worker_id.parse::<IpAddr>().is_ok() || DnsName::try_from(worker_id).is_err() {
        return Err(invalid_name(
            worker_id,
            "a worker id must be a valid DNS name (letters, digits, '-', '.')",
        ));
    }
    if provider.trim().is_empty() {
        return Err(CaError::InvalidArgument(
            "the provider name must not be empty".into(),
        ));
    }
    if valid_days == 0 || valid_days > MAX_WORKER_VALID_DAYS {
        return Err(CaError::InvalidArgument(format!(
            "a worker certificate must be valid for 1 to {MAX_WORKER_VALID_DAYS} days, \
             not {valid_days}"
        )));
    }
    Ok(())
}

/// Parses a CSR, checks its self-signature and returns its public key.
/// Everything else in the CSR (subject, extensions) is ignored.
fn verified_csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, CaError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        CaError::InvalidCsr(format!("no PEM \"CERTIFICATE REQUEST\" block found ({e})"))
    })?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::InvalidCsr(format!("it does not parse ({e})")))?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCsr("it has trailing data".into()));
    }
    csr.verify_signature().map_err(|e| {
        CaError::InvalidCsr(format!(
            "its signature is invalid ({e}): it was not signed with the key it contains"
        ))
    })?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| CaError::InvalidCsr(format!("its public key type is not supported ({e})")))
}

/// Checks that `der` is a CA certificate whose public key is `key`'s, and
/// that its subject is one rcgen can re-encode as an issuer name.
fn check_ca_cert(der: &[u8], key: &KeyPair) -> Result<(), CaError> {
    let invalid = CaError::InvalidCaCertificate;
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("it does not parse ({e})")))?;
    if !rest.is_empty() {
        return Err(invalid("it has trailing data".into()));
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(invalid(
            "it is not a CA certificate (no basicConstraints CA:TRUE)".into(),
        ));
    }
    if !single_valued_rdns(cert.subject()) {
        return Err(invalid(
            "its subject has empty or multi-valued name components".into(),
        ));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::CaKeyMismatch);
    }
    Ok(())
}

fn single_valued_rdns(name: &X509Name<'_>) -> bool {
    name.iter().all(|rdn| rdn.iter().count() == 1)
}

/// The value of the one attribute `values` yields, as a string.
fn single_attribute<'a>(
    mut values: impl Iterator<Item = &'a AttributeTypeAndValue<'a>>,
    what: &str,
) -> Result<String, CaError> {
    let not_worker = CaError::NotWorkerCertificate;
    let first = values
        .next()
        .ok_or_else(|| not_worker(format!("it has no {what}")))?;
    if values.next().is_some() {
        return Err(not_worker(format!("it has more than one {what}")));
    }
    first
        .as_str()
        .map(str::to_owned)
        .map_err(|e| not_worker(format!("its {what} is not a string ({e})")))
}

/// Accepts `sha256:`-prefixed, colon-separated or upper-case hex.
fn normalize_fingerprint(fingerprint: &str) -> Result<String, CaError> {
    let trimmed = fingerprint.trim();
    let hex = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let hex: String = hex
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(CaError::InvalidFingerprint(fingerprint.to_owned()))
    }
}

/// PEM encoding (RFC 7468): base64 in 64-character lines, `\n` endings.
fn der_to_pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut pem = format!("-----BEGIN {label}-----\n");
    let mut line_len = 0;
    for chunk in der.chunks(3) {
        let mut block = [0u8; 3];
        block[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(block[0]) << 16 | u32::from(block[1]) << 8 | u32::from(block[2]);
        for i in 0..4 {
            let c = if i <= chunk.len() {
                char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            };
            pem.push(c);
            line_len += 1;
            if line_len == 64 {
                pem.push('\n');
                line_len = 0;
            }
        }
    }
    if line_len > 0 {
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
