//! QUIC endpoints of the data plane, with mutual TLS.
//!
//! Every worker runs one [`quinn::Endpoint`] ([`endpoint`]) that both
//! serves and dials. Both directions authenticate with certificates issued
//! by the federation CA ([`sovra_proto::ca`]):
//!
//! * serving, the endpoint REQUIRES a client certificate and verifies it
//!   against the CA (rustls's `WebPkiClientVerifier`, client-auth EKU);
//! * dialing ([`connect`]), it presents its own certificate and verifies the
//!   server against the CA for the server name = the expected worker id,
//!   then checks that the certificate's worker id (CN) is that worker id.
//!
//! A peer's identity is the worker id in its verified certificate
//! ([`peer_identity`]), never a field inside a frame. ALPN is
//! [`ALPN`] on both sides; TLS 1.3 only, with the `ring` provider passed
//! explicitly (no process-wide default needed); no 0-RTT.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use sovra_proto::ca;

/// ALPN protocol id of the data plane, offered and required on both sides.
pub const ALPN: &[u8] = b"sovra-dp/1";
/// Interval of QUIC keep-alive packets.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection with no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-stream receive window, bytes: large enough that one activation
/// frame is not throttled to one window per round trip on WAN links.
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Per-connection receive window, bytes: a link's connection carries one stream, so no more
/// than its stream window.
pub const CONNECTION_RECEIVE_WINDOW: u32 = STREAM_RECEIVE_WINDOW;
/// Per-connection send window, bytes.
pub const SEND_WINDOW: u64 = 32 << 20;
/// Unidirectional streams a peer may open on one connection: a link carries one.
pub const MAX_UNI_STREAMS: u32 = 1;

/// Application error code: normal close, no error.
pub const CODE_NO_ERROR: u32 = 0x0;
/// Application error code (CONNECTION_CLOSE): a frame was malformed (see
/// [`crate::frame::FrameError`]).
pub const CODE_MALFORMED_FRAME: u32 = 0x1;
/// Application error code (CONNECTION_CLOSE): a well-formed frame was refused:
/// this peer is not the session's expected sender, or no open session names it.
pub const CODE_UNEXPECTED_FRAME: u32 = 0x2;
/// Application error code (CONNECTION_CLOSE): the peer's certificate does
/// not name the expected worker.
pub const CODE_WRONG_PEER: u32 = 0x3;

/// Application error code: the peer's provider is revoked.
pub const CODE_REVOKED: u32 = 0x4;

/// Application error code: the peer already has [`MAX_CONNECTIONS_PER_PEER`] connections open.
pub const CODE_TOO_MANY_CONNECTIONS: u32 = 0x5;

/// Connections one peer may have open to a worker at once: one per model the two workers share
/// (a sender keeps one link per neighbour and model), and spares for reconnecting while an old
/// connection is still closing.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// A worker's TLS material, all PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The worker's certificate (optionally followed by intermediates).
    pub cert_pem: String,
    /// The worker's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
    /// The federation CA certificate(s) peers must chain to.
    pub ca_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

/// Who is on the other end of a connection, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's worker id (its certificate's CN).
    pub worker_id: String,
    /// The provider operating the peer (its certificate's O).
    pub provider: String,
}

/// Everything that can go wrong setting up or dialing a data-plane endpoint.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS material is unusable or a TLS configuration cannot be built.
    #[error("data-plane TLS setup failed: {0}")]
    Tls(String),
    /// The UDP socket could not be bound (or no tokio runtime is running).
    #[error("could not bind the data-plane endpoint to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Dialing a peer failed: refused, handshake failed, or timed out.
    #[error("could not connect to the data-plane peer at {addr}: {reason}")]
    Connect {
        /// The address dialed.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The peer's identity is missing, unreadable, or not the expected one.
    #[error("data-plane peer identity: {0}")]
    PeerIdentity(String),
}

/// A QUIC endpoint that serves (client certificate REQUIRED, verified
/// against the CA with rustls's `WebPkiClientVerifier`) and dials
/// (presenting its own certificate, verifying the server against the CA for
/// the server name = the peer's worker id). ALPN [`ALPN`] on both sides;
/// keep-alive [`KEEP_ALIVE`] and idle timeout [`IDLE_TIMEOUT`]. Must be
/// called inside a tokio runtime.
pub fn endpoint(listen: SocketAddr, identity: &TlsIdentity) -> Result<quinn::Endpoint, QuicError> {
    let socket = std::net::UdpSocket::bind(listen).map_err(|source| QuicError::Bind {
        addr: listen,
        source,
    })?;
    endpoint_from_socket(socket, identity)
}

/// As [`endpoint`], on a socket already bound (so a worker can learn its port before it has
/// its certificate).
pub fn endpoint_from_socket(
    socket: std::net::UdpSocket,
    identity: &TlsIdentity,
) -> Result<quinn::Endpoint, QuicError> {
    let listen = socket.local_addr().map_err(|source| QuicError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let material = Material::parse(identity)?;
    let restart = restart_config(&material);
    let transport = Arc::new(transport_config());
    let server_tls = server_tls(&material, provider.clone())?;
    let server_tls = QuicServerConfig::try_from(server_tls).map_err(tls_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    server.transport_config(transport.clone());
    let client_tls = client_tls(material, provider)?;
    let client_tls = QuicClientConfig::try_from(client_tls).map_err(tls_err)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(transport);
    let runtime = quinn::default_runtime().ok_or_else(|| QuicError::Bind {
        addr: listen,
        source: std::io::Error::other("no async runtime"),
    })?;
    let mut endpoint =
        quinn::Endpoint::new(restart, Some(server), socket, runtime).map_err(|source| {
            QuicError::Bind {
                addr: listen,
                source,
            }
        })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials `addr` expecting the peer `worker_id`; bounded by `timeout`.
///
/// The server's certificate must chain to the CA and carry `worker_id` as
/// a DNS name; its CN must then be `worker_id` too (otherwise the
/// connection is closed with [`CODE_WRONG_PEER`]).
///
/// In TLS 1.3 the server verifies our certificate after our side of the
/// handshake is complete, so a server that refuses it may let this return
/// `Ok`: the connection then closes at once with the server's TLS alert, and
/// opening or writing streams fails with `ConnectionLost`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    worker_id: &str,
    timeout: Duration,
) -> Result<quinn::Connection, QuicError> {
    if worker_id.parse::<IpAddr>().is_ok() {
        return Err(QuicError::PeerIdentity(format!(
            "{worker_id:?} is an IP address, not a worker id"
        )));
    }
    let failed = |reason: String| QuicError::Connect { addr, reason };
    let connecting = endpoint
        .connect(addr, worker_id)
        .map_err(|e| failed(e.to_string()))?;
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| failed(format!("no QUIC handshake within {timeout:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let peer = peer_identity(&conn)?;
    if peer.worker_id != worker_id {
        conn.close(VarInt::from_u32(CODE_WRONG_PEER), b"unexpected worker id");
        return Err(QuicError::PeerIdentity(format!(
            "expected worker {worker_id:?}, the certificate names {:?}",
            peer.worker_id
        )));
    }
    Ok(conn)
}

/// The verified peer's identity, read from its certificate (via
/// [`ca::worker_identity`]). Fails if the peer presented no certificate or
/// one that is not a sovra worker certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, QuicError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| QuicError::PeerIdentity("the peer presented no certificate".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| QuicError::PeerIdentity("the peer identity is not a certificate".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| QuicError::PeerIdentity("the peer's certificate chain is empty".into()))?;
    let identity = ca::worker_identity(leaf).map_err(|e| QuicError::PeerIdentity(e.to_string()))?;
    Ok(PeerIdentity {
        worker_id: identity.worker_id,
        provider: identity.provider,
    })
}

/// Parsed TLS material.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl Material {
    fn parse(identity: &TlsIdentity) -> Result<Self, QuicError> {
        let chain = pem_certs(&identity.cert_pem, "worker certificate")?;
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|e| QuicError::Tls(format!("the worker private key is unusable ({e})")))?;
        let mut roots = RootCertStore::empty();
        for ca in pem_certs(&identity.ca_pem, "CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| QuicError::Tls(format!("the CA certificate is unusable ({e})")))?;
        }
        Ok(Self {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

/// At least one PEM `CERTIFICATE` block from `pem`.
fn pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QuicError::Tls(format!("the {what} PEM does not parse ({e})")))?;
    if certs.is_empty() {
        return Err(QuicError::Tls(format!(
            "the {what} PEM holds no CERTIFICATE block"
        )));
    }
    Ok(certs)
}

/// TLS 1.3 server config requiring a CA-issued client certificate.
fn server_tls(m: &Material, provider: Arc<CryptoProvider>) -> Result<ServerConfig, QuicError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
        .build()
        .map_err(tls_err)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// TLS 1.3 client config presenting our certificate, trusting only the CA.
fn client_tls(m: Material, provider: Arc<CryptoProvider>) -> Result<ClientConfig, QuicError> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.chain, m.key)
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// An endpoint configuration that survives the worker's restart: the key of its stateless
/// resets and the key that tags its connection ids are derived from the worker's private key
/// (HKDF-SHA256 under labels of their own) instead of drawn at random. A worker restarted on
/// the same address then recognises a peer's packet for a connection of the process it
/// replaces and answers it with a reset the peer accepts, so the peer's connection ends
/// within moments instead of at the idle timeout.
fn restart_config(material: &Material) -> quinn::EndpointConfig {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"sovra data plane")
        .extract(material.key.secret_der());
    let derive = |label: &'static [u8]| {
        let info = [label];
        let okm = prk
            .expand(&info, ring::hmac::HMAC_SHA256)
            .expect("HKDF-SHA256 yields one SHA-256 output");
        ring::hmac::Key::from(okm)
    };
    let reset = derive(b"stateless reset key v1");
    let cids = derive(b"connection id key v1");
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || Box::new(KeyedCids(cids.clone())));
    config
}

/// Connection ids of [`CID_RANDOM`] random bytes and a [`CID_TAG`]-byte HMAC tag under the
/// worker's connection-id key: an id this worker issued (in this process or before a restart)
/// is recognised, and so many random bytes that the reset tokens of a worker's ids cannot be
/// collected one by one, nor an id be drawn twice.
struct KeyedCids(ring::hmac::Key);

const CID_RANDOM: usize = 12;
const CID_TAG: usize = 4;

impl KeyedCids {
    fn tag(&self, random: &[u8]) -> [u8; CID_TAG] {
        let mut tag = [0u8; CID_TAG];
        tag.copy_from_slice(&ring::hmac::sign(&self.0, random).as_ref()[..CID_TAG]);
        tag
    }
}

impl quinn::ConnectionIdGenerator for KeyedCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_RANDOM + CID_TAG];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id[..CID_RANDOM])
            .expect("the system's random source is available");
        let tag = self.tag(&id[..CID_RANDOM]);
        id[CID_RANDOM..].copy_from_slice(&tag);
        quinn::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        match cid.len() == CID_RANDOM + CID_TAG && cid[CID_RANDOM..] == self.tag(&cid[..CID_RANDOM])
        {
            true => Ok(()),
            false => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_RANDOM + CID_TAG
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Keep-alive, idle timeout, flow-control windows; no bidirectional streams.
fn transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .max_concurrent_bidi_streams(VarInt::from_u32(0));
    transport
}

fn tls_err(e: impl std::fmt::Display) -> QuicError {
    QuicError::Tls(e.to_string())
}

#[cfg(test)]
#[path = "quic_tests.rs"]
pub(crate) mod tests;
